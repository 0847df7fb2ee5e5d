"""medfocus.datasets"""
