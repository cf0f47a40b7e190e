"""loractl.launchd"""
