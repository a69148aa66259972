"""``torch.nn.Module`` shells for CLIP: the whole model and its encoders.

The shells are :class:`~polymodal.nn.Shell` s over the specs of :mod:`polymodal.models.clip`
(``state_dict()`` keys equal ``flatten(params)``, plus the batch-norm buffers of ResNet towers);
what they add is construction from a builder or checkpoint name and the ``encode_*`` methods.

>>> import torch
>>> from polymodal.core import random as pr
>>> model = CLIP("clip_tiny", key=pr.key(0))
>>> out = model(torch.randn(2, 3, 64, 64), torch.randint(0, 49407, (2, 32)))
>>> out.image_embeddings.shape, model.encode_text(torch.randint(0, 49407, (3, 32))).shape
(torch.Size([2, 128]), torch.Size([3, 128]))
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

from ..core.pytree import Params, flatten
from ..core.spec import Spec
from ..models.clip import builders as _builders
from ..models.clip import model as _model
from ..models.clip import resnet as _resnet
from ..models.clip import text as _text
from ..models.clip import vision as _vision
from .shell import Shell, shell_class

__all__ = ["CLIP", "CLIPVisionTransformer", "CLIPModifiedResNet", "CLIPTextTransformer"]


def _spec(name_or_config: Any, kwargs: dict) -> _model.CLIP:
    if isinstance(name_or_config, str):
        return _builders.build(name_or_config, **kwargs)
    if kwargs:
        raise TypeError(f"CLIP: builder arguments {sorted(kwargs)} need a builder name, got {name_or_config!r}")
    if isinstance(name_or_config, _model.CLIP):
        return name_or_config
    if name_or_config is None:
        return _builders.build("clip_vit_b32")
    raise TypeError(f"CLIP: expected a builder name (e.g. 'clip_vit_b32', 'ViT-B-32') or a CLIP spec, "
                    f"got {type(name_or_config).__name__}")


def _load_state(shell: Shell, state: Params | None) -> None:
    if state is None:
        return
    buffers = dict(shell.named_buffers())
    with torch.no_grad():
        for k, v in flatten(state).items():
            buffers[k].copy_(v)


class CLIP(shell_class(_model.CLIP)):
    """CLIP as an ``nn.Module``: ``CLIP("clip_vit_b32")``, ``CLIP("ViT-B-32")``, ``CLIP(spec)``.

    ``forward(images, tokens) -> CLIPOutput``; ``encode_image`` / ``encode_text`` use the live
    parameters (and, for ResNet towers, the batch-norm buffers). In ``train()`` mode a ResNet
    tower's batch norm uses batch statistics and updates its buffers, as torch's does.

    Args:
        name_or_config: builder name, OpenAI / open_clip name or a :class:`~polymodal.models.clip.CLIP` spec
            (default: ViT-B/32).
        key: init key (None: drawn from torch's global RNG, as torch.nn modules do).
        device, dtype: where and in which floating dtype the parameters live.
        **builder_kwargs: forwarded to the builder (e.g. ``quick_gelu=False``).
    """

    def __init__(self, name_or_config: Any = None, /, *, key: Tensor | None = None, device=None, dtype=None,
                 **builder_kwargs: Any) -> None:
        Shell.__init__(self, _spec(name_or_config, builder_kwargs), key=key, device=device, dtype=dtype)

    @classmethod
    def from_pretrained_name(cls, name: str, pretrained: bool = False, *, path: str | os.PathLike | None = None,
                             cache_dir: str | os.PathLike | None = None, key: Tensor | None = None, device=None,
                             dtype=None, quick_gelu: bool = True) -> "CLIP":
        """The architecture of OpenAI's ``name`` (``"ViT-B-32"``, ``"ViT-B/32"``, ``"RN50"``, ...),
        with QuickGELU as in their weights; ``pretrained=True`` (or ``path``) loads the weights
        through :func:`~polymodal.models.clip.pretrained.load_pretrained`, else random init."""
        if pretrained or path is not None:
            from ..models.clip.pretrained import load_pretrained

            spec, params, state = load_pretrained(name, path, cache_dir, quick_gelu=quick_gelu)
            model = cls.from_params(spec, params, device=device, dtype=dtype)
            _load_state(model, state)
            return model
        return cls(name, key=key, device=device, dtype=dtype, quick_gelu=quick_gelu)

    @classmethod
    def from_params(cls, spec: Spec, params: Params, state: Params | None = None, **kwargs: Any) -> "CLIP":
        """Wrap existing params (and a ResNet tower's batch-norm ``state``)."""
        model = super().from_params(spec, params, **kwargs)
        _load_state(model, state)
        return model

    def _key(self) -> Tensor | None:
        return self._next_key() if (self.training and self._takes_key) else None

    def encode_image(self, images: Tensor, normalize: bool = True) -> Tensor:
        """``images (B, 3, S, S)`` -> ``(B, E)``; batch norm always uses the running statistics here."""
        return self.spec.encode_image(self.params, images, normalize, state=self.state, key=self._key())

    def encode_text(self, tokens: Tensor, normalize: bool = True) -> Tensor:
        """``tokens (B, T <= context_length)`` -> ``(B, E)``."""
        return self.spec.encode_text(self.params, tokens, normalize)

    def trim_text(self, tokens: Tensor, multiple_of: int | None = None) -> Tensor:
        """The spec's :meth:`~polymodal.models.clip.CLIP.trim_text`: same embeddings, less work."""
        return self.spec.trim_text(tokens, multiple_of)


def _encoder_shell(spec_cls: type, part: str) -> type[Shell]:
    base = shell_class(spec_cls)

    def from_name(cls, name: str, *, key: Tensor | None = None, device=None, dtype=None, **builder_kwargs: Any):
        spec = getattr(_builders.build(name, **builder_kwargs), part)
        if not isinstance(spec, spec_cls):
            raise ValueError(f"{spec_cls.__name__}.from_name: {name!r} has a {type(spec).__name__} {part} tower")
        obj = Shell.__new__(cls)
        Shell.__init__(obj, spec, key=key, device=device, dtype=dtype)
        return obj

    from_name.__doc__ = f"The {part} tower of the builder ``name`` (e.g. ``'clip_vit_b32'``), randomly initialised."
    cls = type(spec_cls.__name__ if spec_cls.__name__.startswith("CLIP") else f"CLIP{spec_cls.__name__}", (base,), {"from_name": classmethod(from_name), "__module__": __name__})
    cls.__doc__ = (f"``nn.Module`` shell over :class:`{spec_cls.__module__}.{spec_cls.__name__}` (its fields, or "
                   f"``{cls.__name__}.from_name(builder_name)``); ``forward`` is the spec's ``__call__``.")
    return cls


CLIPVisionTransformer = _encoder_shell(_vision.CLIPVisionTransformer, "visual")
CLIPModifiedResNet = _encoder_shell(_resnet.ModifiedResNet, "visual")
CLIPTextTransformer = _encoder_shell(_text.CLIPTextTransformer, "text")
CLIPVisionTransformer.__doc__ += """

    >>> import torch
    >>> from polymodal.core import random as pr
    >>> CLIPVisionTransformer.from_name("clip_tiny", key=pr.key(0))(torch.randn(1, 3, 64, 64)).shape
    torch.Size([1, 128])
    """
