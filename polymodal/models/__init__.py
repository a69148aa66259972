"""polymodal.models"""
