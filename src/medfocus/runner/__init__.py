"""medfocus.runner"""
