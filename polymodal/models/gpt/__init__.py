"""Multimodal GPT (VideoGPT / MUGEN style) and generation."""

from .generate import filter_logits, generate, sample_logits
from .model import GPTOutput, MultimodalGPT, multimodal_gpt, video_gpt

__all__ = ["MultimodalGPT", "GPTOutput", "multimodal_gpt", "video_gpt", "generate", "sample_logits", "filter_logits"]

from ...registry import register_family  # noqa: E402

register_family("gpt", builders={"video_gpt": video_gpt}, description="multimodal GPT (VideoGPT / MUGEN)")
