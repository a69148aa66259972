"""MUGEN (Hayes et al. 2022): text-to-video generation with a video VQ-VAE and a multimodal GPT."""

from .builders import BUILDERS, mugen_gpt, mugen_gpt_tiny, text_video_gpt
from .text import CaptionTokenizer

__all__ = ["mugen_gpt", "mugen_gpt_tiny", "text_video_gpt", "CaptionTokenizer", "BUILDERS"]

from ...registry import register_family  # noqa: E402

register_family("video-gpt", builders=BUILDERS, presets={"tiny": "mugen_gpt_tiny", "mugen": "mugen_gpt"},
                description="text-to-video GPT over VQ-VAE codes (MUGEN)")
