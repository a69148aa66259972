"""VQ-VAE (Oord et al. 2017) and the video VQ-VAE of VideoGPT / MUGEN.

* spec :class:`VQVAE` (``encode`` -> codes, ``decode`` <- codes, ``lookup``, ``losses``), state explicit
  (batch norms, the EMA codebook); video encoder/decoder in ``video.py``;
* builders ``video_vqvae`` (VideoGPT), ``mugen_vqvae`` (MUGEN), ``vqvae_tiny``;
* checkpoints: :func:`from_torchmultimodal` / :func:`to_torchmultimodal`, :func:`load_pretrained` (MUGEN's files);
* shells: ``polymodal.nn.build("vqvae_tiny")``; training: ``polymodal train vqvae --preset tiny``.
"""

from .builders import BUILDERS, mugen_vqvae, video_vqvae, vqvae_tiny, vqvae_tiny_narrow
from .convert import from_torchmultimodal, to_torchmultimodal
from .model import VQVAE, VQVAEOutput
from .pretrained import load_pretrained
from .video import AttentionResidualBlock, AxialAttentionBlock, VideoDecoder, VideoEncoder

__all__ = ["VQVAE", "VQVAEOutput", "VideoEncoder", "VideoDecoder", "AttentionResidualBlock", "AxialAttentionBlock",
           "video_vqvae", "mugen_vqvae", "vqvae_tiny", "vqvae_tiny_narrow", "BUILDERS", "from_torchmultimodal",
           "to_torchmultimodal",
           "load_pretrained"]

from ...registry import register_family  # noqa: E402

register_family("vqvae", builders=BUILDERS, presets={"tiny": "vqvae_tiny", "tiny-narrow": "vqvae_tiny_narrow",
                                                     "video": "video_vqvae",
                                                     "mugen": "mugen_vqvae"},
                task="polymodal.models.vqvae.task:VQVAETask",
                description="video VQ-VAE (VideoGPT / MUGEN)",
                extra={"load_pretrained": load_pretrained, "from_torchmultimodal": from_torchmultimodal,
                       "to_torchmultimodal": to_torchmultimodal})
