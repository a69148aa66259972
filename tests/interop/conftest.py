"""JAX interop tests compile many small XLA programs once each: skip XLA's expensive backend
passes (it halves compile time on CPU; the numbers compared are the same ops). Only effective when
JAX's backend starts in this process after this file is read; harmless otherwise. The CLIP tiny
setup (params and torch's reference gradient) is shared by the session."""

import os

_FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FAST_COMPILE).strip()

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def clip_tiny():
    """CLIP tiny, its params (``init`` takes seconds on this CPU: built once for the session), a batch of
    4 images and texts, and the reference: ``torch.func.grad`` of the symmetric InfoNCE loss."""
    import torch

    from jax_testing import clip_loss_torch
    from polymodal.core import random as pr
    from polymodal.models.clip import build

    clip = build("clip_tiny")
    params = clip.init(key=pr.key(0))
    g = torch.Generator().manual_seed(0)
    images = torch.randn(4, 3, clip.image_size, clip.image_size, generator=g)
    tokens = torch.randint(1, 1000, (4, clip.context_length), generator=g)
    loss = float(clip_loss_torch(clip(params, images, tokens)))
    grads = torch.func.grad(lambda p: clip_loss_torch(clip(p, images, tokens)))(params)
    return clip, params, images, tokens, loss, grads
