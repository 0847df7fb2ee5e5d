"""medfocus.bench"""
