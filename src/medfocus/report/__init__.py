"""medfocus.report"""
