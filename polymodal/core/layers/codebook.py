"""Vector-quantisation codebook (VQ-VAE) with its EMA statistics as explicit state.

``out, new_state = Codebook(K, D)(params, z, state, training=..., key=...)`` maps each
``D``-vector of a channel-first encoder output ``z (B, D, *spatial)`` to its nearest code
(squared Euclidean distance, ties to the lowest index) with a straight-through gradient.
The codes are not learned by the optimiser: in training they follow exponential moving
averages of the encoder vectors assigned to them (Oord et al. 2017, App. A.1), with
Laplace smoothing of the usage counts and restart of dead codes, exactly as
TorchMultimodal's ``Codebook`` (and VideoGPT / MUGEN before it) update their buffers.

State (``init_state``): ``embedding (K, D)``, ``code_usage (K,)``, ``code_avg (K, D)`` —
TorchMultimodal's buffer names, so its state dicts load with one added entry — and
``initialized ()`` bool, which replaces its Python flag ``_is_embedding_init``: while it is
False, the first training call sets the codes from random encoder vectors (lazy init).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import random as pr
from ..pytree import Params
from ..spec import Spec, check_dtype, check_floating, check_tensor

__all__ = ["Codebook", "CodebookOutput"]

_INT = (torch.int64, torch.int32)
_STATE = ("embedding", "code_usage", "code_avg", "initialized")


class CodebookOutput(NamedTuple):
    """What :class:`Codebook` returns (TorchMultimodal's ``CodebookOutput``, same fields)."""

    encoded_flat: Tensor  # (N, D), N = B * prod(spatial): the encoder vectors, channel-last
    quantized_flat: Tensor  # (N, D): their codes, straight-through (gradient flows to encoded_flat)
    codebook_indices: Tensor  # (B, *spatial) int64: the chosen code per position
    quantized: Tensor  # (B, D, *spatial): quantized_flat back in z's layout


def _random_vectors(x: Tensor, n: int, key: Tensor) -> Tensor:
    """``n`` rows of ``x (M, D)`` in random order; if ``M < n`` the rows are first tiled
    (``ceil(n / M)`` copies) and jittered with N(0, (0.01 / sqrt(D))^2) noise, as TorchMultimodal."""
    k_noise, k_perm = pr.split(key.to(x.device))
    m, d = x.shape
    if m < n:  # a static shape, not a value: safe under transforms
        x = x.repeat(-(-n // m), 1)
        x = x + pr.normal(k_noise, x.shape, dtype=x.dtype) * (0.01 / math.sqrt(d))
    return x[pr.permutation(k_perm, x.shape[0])[:n]]


def _known_true(flag: Tensor) -> bool:
    """``flag`` is a plain eager CPU tensor holding True: the lazy init is skipped outright. Under
    ``torch.compile``, ``vmap`` / ``grad`` transforms or on an accelerator (no host sync) the
    branch-free ``torch.where`` runs instead."""
    if torch.compiler.is_compiling() or flag.device.type != "cpu" or type(flag) is not torch.Tensor:
        return False
    if torch._C._functorch.is_functorch_wrapped_tensor(flag):
        return False
    return bool(flag)


@dataclass(frozen=True)
class Codebook(Spec):
    """Nearest-neighbour quantisation ``z (B, D, *spatial) -> CodebookOutput`` with EMA codes.

    No params (``init`` gives ``{}``); everything lives in the state. In training (``training=True``,
    which needs a ``key``) the call returns the updated state:

    * lazy init: if ``state["initialized"]`` is False, codes, ``code_avg`` <- ``K`` random encoder
      vectors and ``code_usage`` <- 1 before quantising (``torch.where``, no Python branch);
    * EMA with Laplace smoothing (``n_k`` = vectors assigned to code ``k``, ``s_k`` their sum)::

          usage = decay * usage + (1 - decay) * n
          usage = (usage + eps) / (sum(usage) + K * eps) * sum(usage)
          code_avg = decay * code_avg + (1 - decay) * s
          embedding = code_avg / usage

    * restart: codes with ``usage < usage_threshold`` become random encoder vectors (only the
      ``embedding``; ``code_avg``/``code_usage`` keep their values, as in TorchMultimodal).

    The output is quantised with the codes *before* the EMA step (after the lazy init). The
    state carries no gradient. ``key`` splits into one key for the lazy init and one for the
    restart, so a training step is a deterministic function of ``(z, state, key)``.

    >>> import torch
    >>> from polymodal.core import random as pr
    >>> cb = Codebook(num_embeddings=16, embedding_dim=4)
    >>> state = cb.init_state()
    >>> out, state = cb({}, torch.randn(2, 4, 3, 3), state, training=True, key=pr.key(0))
    >>> out.quantized.shape, out.codebook_indices.shape, bool(state["initialized"])
    (torch.Size([2, 4, 3, 3]), torch.Size([2, 3, 3]), True)
    >>> cb.lookup(state, out.codebook_indices).shape
    torch.Size([2, 3, 3, 4])
    """

    num_embeddings: int  # K, number of codes
    embedding_dim: int  # D, size of a code (z's channel axis)
    decay: float = 0.99  # EMA factor of code_usage and code_avg
    usage_threshold: float = 1.0  # codes whose smoothed usage falls below this are restarted
    epsilon: float = 1e-7  # Laplace smoothing of the usage counts

    def __post_init__(self) -> None:
        if self.num_embeddings < 1 or self.embedding_dim < 1:
            raise ValueError(
                f"Codebook: expected num_embeddings >= 1 and embedding_dim >= 1, "
                f"got {self.num_embeddings} and {self.embedding_dim}"
            )
        if not 0.0 <= self.decay <= 1.0:
            raise ValueError(f"Codebook: expected decay in [0, 1], got {self.decay}")

    def init(self, *, key: Tensor | None = None) -> Params:
        return {}

    def init_state(self, *, key: Tensor | None = None) -> Params:
        """Fresh state: N(0, 1) codes (from ``key``, default ``key(0)``), zero usage, not initialised."""
        e = pr.normal(pr.key(0) if key is None else key, (self.num_embeddings, self.embedding_dim))
        return {
            "embedding": e,
            "code_usage": torch.zeros(self.num_embeddings),
            "code_avg": e.clone(),
            "initialized": torch.tensor(False),
        }

    def _check_state(self, state: Params) -> None:
        if not isinstance(state, dict) or any(k not in state for k in _STATE):
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"Codebook: state: expected keys {sorted(_STATE)}, got {got}")
        k, d = self.num_embeddings, self.embedding_dim
        for name, shape in (("embedding", (k, d)), ("code_avg", (k, d)), ("code_usage", (k,)), ("initialized", ())):
            t = check_tensor(state[name], f"state[{name!r}]", self)
            if tuple(t.shape) != shape:
                raise ValueError(f"Codebook: state[{name!r}]: expected shape {shape}, got {tuple(t.shape)}")
        check_dtype(state["initialized"], "state['initialized']", (torch.bool,), self)

    def __call__(
        self,
        params: Params,
        z: Tensor,
        state: Params | None = None,
        *,
        training: bool = False,
        key: Tensor | None = None,
    ) -> tuple[CodebookOutput, Params]:
        """Args: ``z (B, D, *spatial)``; ``state`` from :meth:`init_state` (None = fresh);
        ``training`` runs the lazy init / EMA / restart (needs ``key``).
        Returns ``(CodebookOutput, new_state)``; in eval ``new_state`` is ``state``."""
        check_floating(z, "z", self)
        if z.dim() < 2 or z.shape[1] != self.embedding_dim:
            raise ValueError(f"Codebook: z: expected shape (B, {self.embedding_dim}, *spatial), got {tuple(z.shape)}")
        if state is None:
            state = {k: v.to(z.device) for k, v in self.init_state().items()}
        self._check_state(state)
        if training and key is None:
            raise ValueError("Codebook: training=True needs a key (lazy init and dead-code restart draw from it)")

        permuted = z.movedim(1, -1)  # (B, *spatial, D)
        encoded_flat = permuted.reshape(-1, self.embedding_dim)
        enc = encoded_flat.detach()
        embedding = state["embedding"].detach()
        if training:
            k_init, k_restart = pr.split(key)
            done = state["initialized"]
            code_avg, usage = state["code_avg"].detach(), state["code_usage"].detach()
            if not _known_true(done):  # the lazy init's draw only where it may apply (equal results)
                init_vectors = _random_vectors(enc, self.num_embeddings, k_init).to(embedding.dtype)
                embedding = torch.where(done, embedding, init_vectors)
                code_avg = torch.where(done, code_avg, init_vectors)
                usage = torch.where(done, usage, torch.ones_like(usage))

        indices = torch.argmin(torch.cdist(enc.to(embedding.dtype), embedding, p=2.0) ** 2, dim=1)
        codes = F.embedding(indices, embedding).to(z.dtype)
        quantized_flat = encoded_flat + (codes - encoded_flat).detach()  # straight-through
        out = CodebookOutput(
            encoded_flat=encoded_flat,
            quantized_flat=quantized_flat,
            codebook_indices=indices.reshape(z.shape[:1] + z.shape[2:]),
            quantized=quantized_flat.reshape(permuted.shape).movedim(-1, 1),
        )
        if not training:
            return out, state
        new_state = self._ema(enc, indices, usage, code_avg, k_restart)
        new_state["initialized"] = torch.ones_like(state["initialized"])
        return out, new_state

    def _ema(self, enc: Tensor, indices: Tensor, usage: Tensor, code_avg: Tensor, key: Tensor) -> Params:
        # Op for op TorchMultimodal's _ema_update_embedding (torch.add(..., alpha=) = its add_).
        onehot = F.one_hot(indices, self.num_embeddings).to(usage.dtype)
        usage = torch.add(usage * self.decay, onehot.sum(0), alpha=1 - self.decay)
        n = usage.sum()
        usage = (usage + self.epsilon) / (n + self.num_embeddings * self.epsilon) * n
        enc = enc.to(code_avg.dtype)
        code_avg = torch.add(code_avg * self.decay, onehot.t() @ enc, alpha=1 - self.decay)
        embedding = code_avg / usage.unsqueeze(1)
        restart = _random_vectors(enc, self.num_embeddings, key)
        embedding = torch.where(usage.unsqueeze(1) >= self.usage_threshold, embedding, restart)
        return {"embedding": embedding, "code_usage": usage, "code_avg": code_avg}

    def lookup(self, params_or_state: Params, indices: Tensor) -> Tensor:
        """Codes of ``indices (*)`` -> ``(*, D)``; takes the state (or any tree with ``embedding``)."""
        check_dtype(indices, "indices", _INT, self)
        if not isinstance(params_or_state, dict) or "embedding" not in params_or_state:
            got = sorted(params_or_state) if isinstance(params_or_state, dict) else type(params_or_state).__name__
            raise ValueError(f"Codebook.lookup: expected a state with key 'embedding', got {got}")
        return F.embedding(indices, params_or_state["embedding"])
