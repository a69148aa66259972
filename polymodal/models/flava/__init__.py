"""FLAVA (Singh et al. 2022): image, text and multimodal encoders, pretraining losses, classification.

* specs: :class:`FLAVAModel` (``model.py``), towers (``encoders.py``), heads and losses (``heads.py``),
  :class:`FLAVAForPreTraining` / :class:`FLAVAForClassification` (``pretraining.py``), the DALL-E dVAE
  encoder (``dvae.py``); builders in ``builders.py``.
"""

from .builders import (
    BUILDERS, SCALES, build, flava_1_8b, flava_2_7b, flava_4_8b, flava_900m, flava_10b, flava_model,
    flava_model_for_classification, flava_model_for_pretraining, flava_tiny, flava_tiny_for_classification,
    flava_tiny_for_pretraining,
)
from .dvae import DalleEncoder
from .encoders import FLAVAImageEncoder, FLAVAMultimodalEncoder, TowerOutput
from .heads import FLAVALosses, FLAVAPretrainingLoss, MaskedPredictionHead
from .model import FLAVAModel, FLAVAOutput
from .pretraining import FLAVAForClassification, FLAVAForPreTraining, FLAVAPreTrainingOutput

__all__ = [
    "BUILDERS", "SCALES", "build", "flava_model", "flava_model_for_pretraining", "flava_model_for_classification",
    "flava_900m", "flava_1_8b", "flava_2_7b", "flava_4_8b", "flava_10b", "flava_tiny", "flava_tiny_for_pretraining",
    "flava_tiny_for_classification", "DalleEncoder", "FLAVAImageEncoder", "FLAVAMultimodalEncoder", "TowerOutput",
    "FLAVALosses", "FLAVAPretrainingLoss", "MaskedPredictionHead", "FLAVAModel", "FLAVAOutput",
    "FLAVAForClassification", "FLAVAForPreTraining", "FLAVAPreTrainingOutput",
]

from ...registry import register_family  # noqa: E402


def _load_pretrained(name, path=None, cache_dir=None, **kw):
    """``polymodal.nn`` shells' loader: TorchMultimodal's published ``flava_full`` checkpoint (or ``path``)."""
    from .pretrained import load_pretrained

    published = {"flava_model": "flava_full_model", "flava_model_for_pretraining": "flava_full"}
    pre = load_pretrained(published.get(name, name), path=path, cache_dir=cache_dir, **kw)
    return pre.spec, pre.params, None


register_family(
    "flava",
    builders=BUILDERS,
    presets={"tiny": "flava_tiny_for_pretraining", "full": "flava_model_for_pretraining"},
    task="polymodal.models.flava.task:FLAVATask",
    description="FLAVA multi-source pretraining: MLM, MIM, MMM, ITM, contrastive (Singh et al. 2022)",
    extra={"build": build, "load_pretrained": _load_pretrained},
)
# Fine-tune the tiny FLAVA classifier on synthetic shapes, optionally with DP-SGD.
register_family(
    "flava-classifier",
    builders={},
    builders_from="flava",
    presets={"tiny": "flava_tiny_for_classification"},
    task="polymodal.models.flava.classifier_task:FLAVAClassifierTask",
    description="fine-tune a tiny FLAVA classifier on synthetic shapes, optionally with DP-SGD",
)
