"""VQ-VAE (Oord et al. 2017): encoder -> nearest-code quantisation -> decoder, with explicit state.

``VQVAE(encoder, decoder, codebook)`` links any encoder/decoder specs through the core
:class:`~polymodal.core.layers.codebook.Codebook` (EMA codes, dead-code restarts). The encoder and
decoder may be stateful (batch norm: ``spec(p, x, state, training=) -> (y, state)``) or not
(``spec(p, x) -> y``; ``init_state()`` is None). The model's state is
``{"encoder": ..., "decoder": ..., "codebook": ...}`` (stateless parts are left out) and is
returned, never mutated: ``out, state = vqvae(params, x, state, training=True, key=k)``.

Losses (:meth:`VQVAE.losses`): reconstruction MSE and the commitment term
``beta * ||sg[e] - z||^2`` (the codebook itself moves by EMA, not by gradients).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ...core import random as pr
from ...core.layers.codebook import Codebook, CodebookOutput
from ...core.losses.vq import commitment_loss
from ...core.pytree import Params, tree_map
from ...core.spec import Spec, check_dtype, check_floating, reading_values_ok

__all__ = ["VQVAE", "VQVAEOutput"]

_INT = (torch.int64, torch.int32)


class VQVAEOutput(NamedTuple):
    """``decoded (B, C, *spatial)``; ``codebook_output`` (TorchMultimodal's ``VQVAEOutput`` fields)."""

    decoded: Tensor
    codebook_output: CodebookOutput


def _stateful(spec: Any) -> bool:
    return spec.init_state() is not None


@dataclass(frozen=True)
class VQVAE(Spec):
    """Vector-quantised autoencoder; params ``encoder``, ``decoder`` (the codebook has none).

    >>> import torch
    >>> from polymodal.core import random as pr
    >>> from polymodal.models.vqvae import vqvae_tiny
    >>> m = vqvae_tiny()
    >>> p, s = m.init(key=pr.key(0)), m.init_state()
    >>> out, s = m(p, torch.rand(2, 3, 8, 32, 32), s, training=True, key=pr.key(1))
    >>> out.decoded.shape, m.encode(p, torch.rand(1, 3, 8, 32, 32), s).shape
    (torch.Size([2, 3, 8, 32, 32]), torch.Size([1, 4, 8, 8]))
    """

    encoder: Spec  # x (B, C, *spatial) -> z (B, D, *latent); exposes in_channels and downsample
    decoder: Spec  # z (B, D, *latent) -> x (B, C, *spatial)
    codebook: Codebook  # K codes of width D, EMA state
    beta: float = 0.25  # commitment weight (TorchMultimodal's CommitmentLoss default is 1.0)

    @property
    def num_embeddings(self) -> int:
        return self.codebook.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.codebook.embedding_dim

    def init(self, *, key: Tensor) -> Params:
        ke, kd = pr.split(key)
        return {"encoder": self.encoder.init(key=ke), "decoder": self.decoder.init(key=kd)}

    def init_state(self, *, key: Tensor | None = None) -> Params:
        s: Params = {"codebook": self.codebook.init_state(key=key)}
        for name in ("encoder", "decoder"):
            if _stateful(getattr(self, name)):
                s[name] = getattr(self, name).init_state()
        return s

    # -- shapes and checks ----------------------------------------------------------------------
    def latent_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The code grid of an input's spatial shape, e.g. ``(T, H, W) -> (T / 4, H / 4, W / 4)``;
        raises when an axis is not divisible by the downsampling."""
        down = self.encoder.downsample
        input_shape = tuple([int(d) for d in input_shape])
        if len(input_shape) != len(down) or any([d % s for d, s in zip(input_shape, down)]):
            raise ValueError(f"VQVAE: expected an input of spatial shape divisible by the downsampling {down}, "
                             f"got {input_shape}")
        return tuple([d // s for d, s in zip(input_shape, down)])

    def _check_input(self, x: Tensor) -> None:
        check_floating(x, "x", self)
        c, n = self.encoder.in_channels, len(self.encoder.downsample)
        if x.dim() != n + 2 or x.shape[1] != c:
            raise ValueError(f"VQVAE: x: expected shape (B, {c}, <{n} spatial axes>), got {tuple(x.shape)}")
        self.latent_shape(tuple(x.shape[2:]))

    def _check_codes(self, codes: Tensor) -> None:
        check_dtype(codes, "codes", _INT, self)
        k = self.num_embeddings
        if codes.device.type == "cpu" and codes.numel() and reading_values_ok(codes):
            lo, hi = (int(t) for t in torch.aminmax(codes))
            if lo < 0 or hi >= k:
                raise ValueError(f"VQVAE: codes: expected codes in [0, {k}) (the codebook has {k} entries), "
                                 f"got codes from {lo} to {hi}")

    def _state(self, state: Params | None, device) -> Params:
        if state is None:
            state = tree_map(lambda t: t.to(device), self.init_state())
        return state

    def _run(self, name: str, params: Params, x: Tensor, state: Params, training: bool) -> tuple[Tensor, Any]:
        spec = getattr(self, name)
        if name in state:
            return spec(params[name], x, state[name], training=training)
        return spec(params[name], x), None

    # -- the pieces -----------------------------------------------------------------------------
    def encode(self, params: Params, x: Tensor, state: Params | None = None, *,
               return_embeddings: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Codes ``(B, *latent)`` of ``x (B, C, *spatial)`` (eval mode); with ``return_embeddings``
        also the quantised vectors ``(B, D, *latent)``."""
        self._check_input(x)
        state = self._state(state, x.device)
        z, _ = self._run("encoder", params, x, state, False)
        out, _ = self.codebook({}, z, state["codebook"])
        return (out.codebook_indices, out.quantized) if return_embeddings else out.codebook_indices

    def lookup(self, state: Params, codes: Tensor) -> Tensor:
        """Code vectors of ``codes (B, *latent)`` -> ``(B, *latent, D)``."""
        self._check_codes(codes)
        return self.codebook.lookup(state["codebook"], codes)

    def decode(self, params: Params, codes: Tensor, state: Params | None = None) -> Tensor:
        """``codes (B, *latent)`` -> reconstruction ``(B, C, *spatial)`` (eval mode)."""
        state = self._state(state, codes.device)
        z = self.lookup(state, codes).movedim(-1, 1)
        x, _ = self._run("decoder", params, z, state, False)
        return x

    def __call__(self, params: Params, x: Tensor, state: Params | None = None, *, training: bool = False,
                 key: Tensor | None = None) -> tuple[VQVAEOutput, Params]:
        """Encode, quantise (straight-through), decode. In training the batch norms use batch
        statistics and the codebook runs its lazy init / EMA / restarts (``key`` required).
        Returns ``(VQVAEOutput, new_state)``."""
        self._check_input(x)
        state = self._state(state, x.device)
        new_state: Params = {}
        z, s = self._run("encoder", params, x, state, training)
        if s is not None:
            new_state["encoder"] = s
        cb, new_state["codebook"] = self.codebook({}, z, state["codebook"], training=training, key=key)
        decoded, s = self._run("decoder", params, cb.quantized, state, training)
        if s is not None:
            new_state["decoder"] = s
        return VQVAEOutput(decoded, cb), new_state

    def losses(self, out: VQVAEOutput, x: Tensor) -> dict[str, Tensor]:
        """``{"reconstruction": mse(decoded, x), "commitment": beta * mse(sg[codes], z), "loss": sum}``."""
        rec = F.mse_loss(out.decoded, x)
        com = commitment_loss(out.codebook_output.quantized_flat, out.codebook_output.encoded_flat, self.beta)
        return {"reconstruction": rec, "commitment": com, "loss": rec + com}
