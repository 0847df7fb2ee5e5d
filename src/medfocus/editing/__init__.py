"""medfocus.editing"""
