"""ALBEF (Li et al. 2021, "Align before Fuse"): encoders, momentum state, retrieval and VQA models,
TorchMultimodal converters, published checkpoints and training tasks.

* specs: :class:`ALBEFModel` (shared ViT, BERT text encoder, cross-attending multimodal encoder),
  :class:`ALBEFForRetrieval` (ITC with momentum distillation + queues, ITM on sampled hard negatives,
  MLM; re-ranking retrieval), :class:`ALBEFForVQA` (answer decoder ranking candidate answers);
* state: :func:`momentum_update`, :func:`enqueue` (``momentum.py``): passed in and returned;
* checkpoints: :func:`from_torchmultimodal` / :func:`to_torchmultimodal`, :func:`load_pretrained`;
* training: ``polymodal train albef --preset tiny`` (retrieval), ``polymodal train albef-vqa --preset tiny``.
"""

from .builders import (
    BUILDERS, albef_model, albef_pretraining, albef_retrieval, albef_tiny, albef_vqa, albef_vqa_tiny, build,
)
from .heads import PredictionHead
from .losses import clm_loss, itc_loss, mlm_distill_loss, negative_weights, sample_negatives
from .model import ALBEFModel, ALBEFModelOutput
from .momentum import enqueue, init_queues, momentum_update
from .retrieval import ALBEFForRetrieval, ALBEFOutput
from .vqa import ALBEFForVQA

__all__ = [
    "BUILDERS", "build", "albef_model", "albef_retrieval", "albef_pretraining", "albef_vqa", "albef_tiny",
    "albef_vqa_tiny", "PredictionHead", "clm_loss", "itc_loss", "mlm_distill_loss", "negative_weights",
    "sample_negatives", "ALBEFModel", "ALBEFModelOutput", "enqueue", "init_queues", "momentum_update",
    "ALBEFForRetrieval", "ALBEFOutput", "ALBEFForVQA",
]

from ...registry import register_family  # noqa: E402
from .pretrained import Pretrained, load_pretrained  # noqa: E402
from .pretrained import shell_loader as _shell_loader  # noqa: E402
from .convert import from_torchmultimodal, to_torchmultimodal  # noqa: E402
from .rerank import recall_from_scores, retrieval_scores  # noqa: E402

__all__ += ["Pretrained", "load_pretrained", "from_torchmultimodal", "to_torchmultimodal", "recall_from_scores",
            "retrieval_scores"]

register_family(
    "albef",
    builders=BUILDERS,
    presets={"tiny": "albef_tiny", "retrieval": "albef_retrieval", "pretraining": "albef_pretraining"},
    task="polymodal.models.albef.task:ALBEFRetrievalTask",
    extra={"build": build, "load_pretrained": _shell_loader},
    description="ALBEF image-text retrieval pretraining: ITC + ITM + MLM with momentum distillation (Li et al. 2021)",
)
register_family(
    "albef-vqa",
    builders={},
    builders_from="albef",
    presets={"tiny": "albef_vqa_tiny", "vqa": "albef_vqa"},
    task="polymodal.models.albef.vqa_task:ALBEFVQATask",
    description="ALBEF VQA: an answer decoder ranking candidate answers, on synthetic shape questions",
)
