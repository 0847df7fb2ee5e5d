"""medfocus.evaluation"""
