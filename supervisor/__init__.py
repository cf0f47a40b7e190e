"""loractl.supervisor"""
