"""Multimodal GPT (VideoGPT / MUGEN style) and generation."""

from .generate import filter_logits, generate, sample_logits
from .model import GPTOutput, MultimodalGPT, video_gpt

__all__ = ["MultimodalGPT", "GPTOutput", "video_gpt", "generate", "sample_logits", "filter_logits"]
