"""polymodal.core.encoders"""
