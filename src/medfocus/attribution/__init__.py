"""medfocus.attribution"""
