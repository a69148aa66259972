"""Generation for :class:`MultimodalGPT`: lives in :mod:`polymodal.core.encoders.gpt_generate`."""

from ...core.encoders.gpt_generate import filter_logits, generate, sample_logits

__all__ = ["sample_logits", "filter_logits", "generate"]
