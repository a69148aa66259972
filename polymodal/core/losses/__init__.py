"""polymodal.core.losses: loss functions (plain functions) and loss specs with learnable params."""

__all__: list[str] = []

from .contrastive import ContrastiveLoss, ContrastiveLossOutput, contrastive_loss_with_temperature, gather_embeddings  # noqa: E402
from .vq import commitment_loss  # noqa: E402

__all__ += [
    "ContrastiveLoss", "ContrastiveLossOutput", "contrastive_loss_with_temperature", "gather_embeddings",
    "commitment_loss",
]
