"""MUGEN (Hayes et al. 2022): text-to-video generation with a video VQ-VAE and a multimodal GPT.

* specs: :class:`~polymodal.core.encoders.gpt.MultimodalGPT` built by ``mugen_gpt`` (published),
  ``mugen_gpt_tiny`` (synthetic moving shapes) and ``text_video_gpt``; VideoGPT's ``video_gpt`` is in
  ``polymodal.core.encoders.gpt``; generation (top-k / top-p, KV cache) in ``core/encoders/gpt_generate.py``;
* checkpoints: :func:`from_torchmultimodal` / :func:`to_torchmultimodal`, :func:`load_pretrained`;
* training ``polymodal train video-gpt --vqvae RUN``; ``polymodal generate --run RUN "a blue square moves up"``.
"""

from .builders import BUILDERS, mugen_gpt, mugen_gpt_tiny, text_video_gpt
from .convert import from_torchmultimodal, to_torchmultimodal
from .pretrained import load_pretrained
from .text import CaptionTokenizer

__all__ = ["mugen_gpt", "mugen_gpt_tiny", "text_video_gpt", "CaptionTokenizer", "BUILDERS", "from_torchmultimodal",
           "to_torchmultimodal", "load_pretrained"]

from ...registry import register_family  # noqa: E402

register_family("video-gpt", builders=BUILDERS, presets={"tiny": "mugen_gpt_tiny", "mugen": "mugen_gpt"},
                task="polymodal.models.mugen.task:VideoGPTTask",
                description="text-to-video GPT over VQ-VAE codes (MUGEN)",
                extra={"load_pretrained": load_pretrained, "from_torchmultimodal": from_torchmultimodal,
                       "to_torchmultimodal": to_torchmultimodal})

# VideoCLIP (text-video retrieval): its own family, files videoclip*.py (docs/models/mugen.md).
from . import videoclip_convert as _vc_convert, videoclip_pretrained as _vc_pretrained  # noqa: E402
from .videoclip_builders import VIDEOCLIP_BUILDERS  # noqa: E402

register_family("videoclip", builders=VIDEOCLIP_BUILDERS, presets={"tiny": "videoclip_tiny", "mugen": "videoclip"},
                task="polymodal.models.mugen.videoclip_task:VideoCLIPTask",
                description="text-video retrieval: S3D + DistilBERT, contrastive (MUGEN's VideoCLIP)",
                extra={"load_pretrained": _vc_pretrained.load_pretrained,
                       "from_torchmultimodal": _vc_convert.from_torchmultimodal,
                       "to_torchmultimodal": _vc_convert.to_torchmultimodal})
