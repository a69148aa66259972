"""MUGEN's VideoCLIP: text-video retrieval by contrastive learning (Hayes et al. 2022, MUGEN, Section 4.1).

A DistilBERT text encoder (its first token's last hidden state) and an S3D video encoder (the
pooled features before torchvision's classifier), each followed by a :class:`Projection` MLP to
a joint ``proj_dim`` space; the embeddings are L2-normalised and trained with the symmetric
contrastive loss (``core/losses/contrastive.py``). TorchMultimodal composes the same model as
``CLIP(encoder_a=text, encoder_b=video)`` in ``examples/mugen/retrieval/video_clip.py``.

Params and state::

    params: text: {encoder: BERT params (core/encoders/bert.py), projection: {linear1, linear2: {weight},
                   layer_norm: {weight, bias}}},
            video: {encoder: S3D params (core/encoders/s3d.py, torchvision's names), projection: (as text)},
            logit_scale: ()  (the contrastive loss's learned log inverse temperature)
    state:  video: {encoder: S3D batch-norm statistics}

``out, new_state = model(params, video, input_ids, state, training=...)`` — always a pair, since
the video tower carries batch-norm statistics (unchanged unless ``training``).

MUGEN's loss settings are kept: TorchMultimodal's Lightning module passes ``logit_scale=0.07``
as the *log* scale (so the initial inverse temperature is ``exp(0.07) = 1.07``, not CLIP's
``1 / 0.07``), no lower clamp and an upper clamp of 100 on the log scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ...core import random as pr
from ...core.encoders.bert import BERTTextEncoder
from ...core.encoders.s3d import S3D
from ...core.layers.dropout import dropout
from ...core.layers.linear import Linear
from ...core.layers.norm import LayerNorm
from ...core.losses.contrastive import ContrastiveLoss, ContrastiveLossOutput
from ...core.pytree import Params, tree_map
from ...core.spec import Spec, check_dtype

__all__ = ["Projection", "VideoCLIP", "VideoCLIPOutput"]

_INT = (torch.int64, torch.int32, torch.int16, torch.uint8)


@dataclass(frozen=True)
class Projection(Spec):
    """``LayerNorm(h + Dropout(Linear(GELU(h))))`` with ``h = Linear(x)`` (no biases): ``(B, in_dim) ->
    (B, out_dim)``. Params ``linear1``, ``linear2`` ``{weight}``, ``layer_norm`` ``{weight, bias}``
    (TorchMultimodal's ``examples/mugen/retrieval/video_clip.py::Projection``)."""

    in_dim: int  # size of the encoder output
    out_dim: int = 256  # size of the joint embedding (MUGEN: 256)
    dropout: float = 0.1  # after linear2, in training (MUGEN: 0.1)

    def _layers(self) -> tuple[Linear, Linear, LayerNorm]:
        return (Linear(self.in_dim, self.out_dim, bias=False), Linear(self.out_dim, self.out_dim, bias=False),
                LayerNorm(self.out_dim))

    def init(self, *, key: Tensor) -> Params:
        k1, k2 = pr.split(key)
        l1, l2, ln = self._layers()
        return {"linear1": l1.init(key=k1), "linear2": l2.init(key=k2), "layer_norm": ln.init(key=key)}

    def __call__(self, params: Params, x: Tensor, *, key: Tensor | None = None) -> Tensor:
        l1, l2, ln = self._layers()
        h = l1(params["linear1"], x)
        y = dropout(l2(params["linear2"], F.gelu(h)), self.dropout, key=key)
        return ln(params["layer_norm"], h + y)


class VideoCLIPOutput(NamedTuple):
    """L2-normalised embeddings (TorchMultimodal's ``CLIPOutput``: ``embeddings_a`` text, ``embeddings_b`` video)."""

    text_embeddings: Tensor  # (B, proj_dim)
    video_embeddings: Tensor  # (B, proj_dim)
    logit_scale: Tensor  # () log inverse temperature, for the loss


@dataclass(frozen=True)
class VideoCLIP(Spec):
    """Text and video towers with projections: ``video (B, 3, T, H, W), input_ids (B, L) ->
    (VideoCLIPOutput, new_state)``; see the module docstring.

    >>> import torch
    >>> from polymodal.core import random as pr
    >>> from polymodal.models.mugen.videoclip_builders import videoclip_tiny
    >>> spec = videoclip_tiny()
    >>> p, s = spec.init(key=pr.key(0)), spec.init_state()
    >>> out, s2 = spec(p, torch.rand(2, 3, 8, 32, 32), torch.tensor([[1, 5, 6, 2], [1, 7, 2, 0]]), s)
    >>> out.text_embeddings.shape, out.video_embeddings.shape, s2 is s
    (torch.Size([2, 32]), torch.Size([2, 32]), True)
    """

    text: BERTTextEncoder  # DistilBERT; its first token's last hidden state is the text feature
    video: S3D  # S3D without classifier; its pooled features are the video feature
    proj_dim: int = 256  # joint embedding size (MUGEN: 256)
    proj_dropout: float = 0.1  # dropout inside both projections (MUGEN: 0.1)
    logit_scale_init: float = 0.07  # initial log inverse temperature (MUGEN: 0.07, see the module docstring)
    logit_scale_min: float | None = None  # lower clamp of the log scale in the loss (MUGEN: none)
    logit_scale_max: float | None = 100.0  # upper clamp of the log scale in the loss (MUGEN: 100)

    def __post_init__(self) -> None:
        if self.video.num_classes is not None:
            raise ValueError(f"VideoCLIP: video: expected an S3D without classifier (num_classes=None), "
                             f"got num_classes={self.video.num_classes}")

    def text_projection(self) -> Projection:
        return Projection(self.text.hidden_size, self.proj_dim, self.proj_dropout)

    def video_projection(self) -> Projection:
        return Projection(self.video.feature_dim, self.proj_dim, self.proj_dropout)

    def loss_spec(self) -> ContrastiveLoss:
        return ContrastiveLoss(self.logit_scale_init, self.logit_scale_min, self.logit_scale_max)

    @property
    def context_length(self) -> int:
        """The longest token sequence the text encoder takes (its position table)."""
        return self.text.embeddings.max_position_embeddings

    def init(self, *, key: Tensor) -> Params:
        kt, ktp, kv, kvp = pr.split(key, 4)
        return {"text": {"encoder": self.text.init(key=kt), "projection": self.text_projection().init(key=ktp)},
                "video": {"encoder": self.video.init(key=kv), "projection": self.video_projection().init(key=kvp)},
                "logit_scale": torch.tensor(float(self.logit_scale_init))}

    def init_state(self) -> Params:
        return {"video": {"encoder": self.video.init_state()}}

    def check_text(self, input_ids: Tensor) -> None:
        check_dtype(input_ids, "VideoCLIP: input_ids", _INT)
        if input_ids.dim() != 2:
            raise ValueError(f"VideoCLIP: expected input_ids of shape (B, L), got {tuple(input_ids.shape)}")
        if input_ids.shape[1] > self.context_length:
            raise ValueError(f"VideoCLIP: text of {input_ids.shape[1]} tokens is longer than the text context: "
                             f"expected at most {self.context_length} tokens")

    def encode_text(self, params: Params, input_ids: Tensor, normalize: bool = True, *,
                    key: Tensor | None = None) -> Tensor:
        """``input_ids (B, L <= context_length)`` int (padding ``text.embeddings.pad_token_id`` is
        masked) -> ``(B, proj_dim)``, unit norm if ``normalize``; ``key``: dropout (training)."""
        self.check_text(input_ids)
        ke, kp = pr.maybe_split(key, 2)
        h = self.text(params["text"]["encoder"], input_ids, key=ke).last_hidden_state[:, 0]
        y = self.text_projection()(params["text"]["projection"], h, key=kp)
        return F.normalize(y, dim=-1) if normalize else y

    def _video(self, params: Params, video: Tensor, state: Params | None, training: bool,
               key: Tensor | None) -> tuple[Tensor, Params]:
        if state is None:
            state = tree_map(lambda t: t.to(video.device), self.init_state())
        h, new = self.video(params["video"]["encoder"], video, state["video"]["encoder"], training=training)
        y = self.video_projection()(params["video"]["projection"], h, key=key)
        return y, (state if new is state["video"]["encoder"] else {"video": {"encoder": new}})

    def encode_video(self, params: Params, video: Tensor, normalize: bool = True, *, state: Params | None = None,
                     key: Tensor | None = None) -> Tensor:
        """``video (B, 3, T, H, W)`` -> ``(B, proj_dim)``, unit norm if ``normalize``. ``state``: the
        batch-norm statistics (``None``: fresh ones), used and never updated here."""
        y, _ = self._video(params, video, state, False, key)
        return F.normalize(y, dim=-1) if normalize else y

    def __call__(self, params: Params, video: Tensor, input_ids: Tensor, state: Params | None = None, *,
                 training: bool = False, key: Tensor | None = None) -> tuple[VideoCLIPOutput, Params]:
        """Both towers, L2-normalised, and the log scale.

        Args:
            video: ``(B, 3, T, H, W)`` float. input_ids: ``(B, L <= context_length)`` int.
            state: S3D batch-norm statistics (``None``: fresh ones); ``training=True`` normalises
                with batch statistics and advances them.
            key: dropout key (used when ``training``).
        Returns:
            ``(VideoCLIPOutput, new_state)``.
        """
        self.check_text(input_ids)
        kt, kv = pr.maybe_split(key if training else None, 2)
        v, new_state = self._video(params, video, state, training, kv)
        out = VideoCLIPOutput(self.encode_text(params, input_ids, key=kt), F.normalize(v, dim=-1),
                              params["logit_scale"])
        return out, new_state

    def loss(self, params: Params, out: VideoCLIPOutput, **kw) -> ContrastiveLossOutput:
        """The symmetric contrastive loss over a batch of pairs (TorchMultimodal's
        ``ContrastiveLossWithTemperature(text, video)`` with MUGEN's clamps); ``kw`` as
        :class:`~polymodal.core.losses.contrastive.ContrastiveLoss` (``backprop_type``, ``group``)."""
        return self.loss_spec()({"logit_scale": params["logit_scale"]}, out.text_embeddings, out.video_embeddings, **kw)

