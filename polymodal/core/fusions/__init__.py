"""polymodal.core.fusions"""
