"""loractl.client"""
