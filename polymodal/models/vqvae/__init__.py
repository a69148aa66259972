"""VQ-VAE (Oord et al. 2017) and the video VQ-VAE of VideoGPT / MUGEN."""

from .builders import BUILDERS, mugen_vqvae, video_vqvae, vqvae_tiny
from .model import VQVAE, VQVAEOutput
from .video import AttentionResidualBlock, AxialAttentionBlock, VideoDecoder, VideoEncoder

__all__ = ["VQVAE", "VQVAEOutput", "VideoEncoder", "VideoDecoder", "AttentionResidualBlock", "AxialAttentionBlock",
           "video_vqvae", "mugen_vqvae", "vqvae_tiny", "BUILDERS"]

from ...registry import register_family  # noqa: E402

register_family("vqvae", builders=BUILDERS, presets={"tiny": "vqvae_tiny", "video": "video_vqvae",
                                                     "mugen": "mugen_vqvae"},
                description="video VQ-VAE (VideoGPT / MUGEN)")
