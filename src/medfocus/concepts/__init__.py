"""medfocus.concepts"""
