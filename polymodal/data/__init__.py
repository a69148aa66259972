"""polymodal.data"""
