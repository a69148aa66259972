"""Multimodal GPT: the spec lives in :mod:`polymodal.core.encoders.gpt` (shared with the MUGEN family);
this module keeps the family's names."""

from ...core.encoders.gpt import GPTOutput, MultimodalGPT, multimodal_gpt, video_gpt

__all__ = ["MultimodalGPT", "GPTOutput", "multimodal_gpt", "video_gpt"]
