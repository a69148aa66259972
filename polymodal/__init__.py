"""polymodal: multimodal models over a functional core."""
