"""medfocus.datasets.synthetic"""
