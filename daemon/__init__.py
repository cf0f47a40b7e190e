"""loractl.daemon"""
