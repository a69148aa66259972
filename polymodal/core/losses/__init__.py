"""polymodal.core.losses"""
