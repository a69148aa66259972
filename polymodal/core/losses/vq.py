"""Vector-quantisation losses (VQ-VAE): the commitment term."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ..spec import check_floating

__all__ = ["commitment_loss"]


def commitment_loss(quantized: Tensor, encoded: Tensor, beta: float = 0.25) -> Tensor:
    """``beta * mean((sg[quantized] - encoded)^2)``: pulls the encoder towards its codes.

    The third term of Eq. 3 in Oord et al. 2017; the gradient flows only into ``encoded``
    (``quantized`` is detached). TorchMultimodal's ``CommitmentLoss(commitment_cost)`` with
    ``commitment_cost = beta`` (its default is 1.0; 0.25 is the paper's).

    Args:
        quantized: codes for the encoder output, any shape (e.g. ``CodebookOutput.quantized``).
        encoded: the encoder output, same shape.
        beta: the commitment weight.
    Returns:
        a scalar.

    >>> import torch
    >>> float(commitment_loss(torch.zeros(2, 3), torch.ones(2, 3), beta=0.5))
    0.5
    """
    check_floating(quantized, "commitment_loss: quantized")
    check_floating(encoded, "commitment_loss: encoded")
    if quantized.shape != encoded.shape:
        raise ValueError(
            f"commitment_loss: expected quantized and encoded of the same shape, "
            f"got {tuple(quantized.shape)} and {tuple(encoded.shape)}"
        )
    return F.mse_loss(quantized.detach(), encoded) * beta
