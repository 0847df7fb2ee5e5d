"""medfocus.lvlm"""
