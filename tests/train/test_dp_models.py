"""The model zoo of the per-sample / DP tests: every layer kind, each with a per-example loss.

Each :class:`Case` gives params, ``loss(params, batch[, key=]) -> (B,)`` and a batch maker;
the reference for per-example gradients is a loop of ``torch.func.grad`` over batches of one.
The tests here check the zoo itself (losses are per example: shape ``(B,)``, and example
``i``'s loss does not depend on the other examples).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad

from polymodal.core import pytree
from polymodal.core import random as pr
from polymodal.core.layers import (
    MLP, BatchNorm2d, Codebook, Conv, Embedding, GroupNorm, LayerNorm, Linear, PatchEmbedding, RMSNorm,
)
from polymodal.core.layers.attention import MultiHeadAttention
from polymodal.core.layers.transformer import TransformerEncoder, TransformerEncoderLayer


class Case(NamedTuple):
    name: str
    params: dict
    loss: Callable  # (params, batch[, key=]) -> (B,)
    batch: Callable[[int, int], Any]  # (batch size, seed) -> batch
    uses_key: bool = False  # the loss takes a dropout key
    fallback: tuple[str, ...] = ()  # parameters the ghost step computes by vmap
    has_aux: bool = False  # the loss returns (losses, aux)


def _x(seed: int, *shape: int) -> torch.Tensor:
    return pr.normal(pr.key(seed), shape)


def _sq(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return ((y - t) ** 2).flatten(1).sum(1)


def _k(i: int) -> torch.Tensor:
    return pr.key(100 + i)


def _linear_cases() -> list[Case]:
    lin, seq, direct = Linear(5, 3), Linear(8, 6), Linear(3, 2)
    return [
        Case("linear", lin.init(key=_k(0)), lambda p, b: _sq(lin(p, b["x"]), b["y"]),
             lambda n, s: {"x": _x(s, n, 5), "y": _x(s + 1, n, 3)}),
        # T = 3 -> ghost (9 < 48); T = 20 over two middle axes -> direct (400 >= 6)
        Case("linear_seq_ghost", seq.init(key=_k(1)), lambda p, b: _sq(seq(p, b["x"]), b["y"]),
             lambda n, s: {"x": _x(s, n, 3, 8), "y": _x(s + 1, n, 3, 6)}),
        Case("linear_seq_direct", direct.init(key=_k(2)), lambda p, b: _sq(direct(p, b["x"]), b["y"]),
             lambda n, s: {"x": _x(s, n, 4, 5, 3), "y": _x(s + 1, n, 4, 5, 2)}),
    ]


def _embedding_cases() -> list[Case]:
    emb, head = Embedding(11, 4, padding_idx=0), Linear(4, 2)
    p = {"emb": emb.init(key=_k(3)), "head": head.init(key=_k(4))}

    def loss(p, b):
        return _sq(head(p["head"], emb(p["emb"], b["ids"]).mean(1)), b["y"])

    w = {"w": pr.normal(_k(5), (11, 4)), "ln": LayerNorm(4).init(key=None)}

    def tied(p, b):  # the embedding matrix is also the output projection (weight tying)
        h = LayerNorm(4)(p["ln"], F.embedding(b["ids"], p["w"]))
        return F.cross_entropy(F.linear(h, p["w"]).transpose(1, 2), b["ids"].roll(1, 1), reduction="none").sum(1)

    ids = lambda n, s: pr.randint(pr.key(s), (n, 6), 0, 11)  # noqa: E731
    return [Case("embedding", p, loss, lambda n, s: {"ids": ids(n, s), "y": _x(s + 1, n, 2)}),
            Case("tied_embedding", w, tied, lambda n, s: {"ids": ids(n, s)})]


def _norm_cases() -> list[Case]:
    ln, rms, lin = LayerNorm(6), RMSNorm(6), Linear(6, 6)
    p = {"ln": ln.init(key=None), "rms": rms.init(key=None), "lin": lin.init(key=_k(6))}
    p["ln"] = pytree.tree_map(lambda t: t + 0.1 * pr.normal(_k(7), t.shape), p["ln"])

    def loss(p, b):
        return _sq(rms(p["rms"], lin(p["lin"], ln(p["ln"], b["x"]))), b["y"])

    conv, gn = Conv(2, 3, 4, 3, padding=1), GroupNorm(2, 4)
    q = {"conv": conv.init(key=_k(8)), "gn": gn.init(key=None)}
    q["gn"] = pytree.tree_map(lambda t: t + 0.1 * pr.normal(_k(9), t.shape), q["gn"])

    def gloss(p, b):
        return (gn(p["gn"], conv(p["conv"], b["x"])) * b["w"]).flatten(1).sum(1)

    mlp = MLP(6, 3, hidden_dims=(8,), activation="gelu", dropout=0.3, norm="layer_norm")
    return [
        Case("norms", p, loss, lambda n, s: {"x": _x(s, n, 4, 6), "y": _x(s + 1, n, 4, 6)}),
        Case("group_norm", q, gloss, lambda n, s: {"x": _x(s, n, 3, 5, 5), "w": _x(s + 1, n, 4, 5, 5)}),
        Case("mlp_dropout", mlp.init(key=_k(10)), lambda p, b, key=None: _sq(mlp(p, b["x"], key=key), b["y"]),
             lambda n, s: {"x": _x(s, n, 3, 6), "y": _x(s + 1, n, 3, 3)}, uses_key=True),
    ]


def _conv_cases() -> list[Case]:
    c3, patch, c1, c3d = Conv(2, 2, 4, 3, padding=1), Conv(2, 4, 3, 2, stride=2), Conv(1, 2, 3, 3, padding="same"), \
        Conv(3, 1, 2, 2, stride=2)
    p = {"c3": c3.init(key=_k(11)), "patch": patch.init(key=_k(12)), "c1": c1.init(key=_k(13)),
         "c3d": c3d.init(key=_k(14))}

    def loss(p, b):
        h = patch(p["patch"], torch.tanh(c3(p["c3"], b["img"])))  # (B, 3, 3, 3)
        s = c1(p["c1"], b["seq"]) * b["wseq"]
        v = c3d(p["c3d"], b["vid"])
        return (h * b["w"]).flatten(1).sum(1) + s.flatten(1).sum(1) + v.pow(2).flatten(1).sum(1)

    return [Case("conv", p, loss, lambda n, s: {"img": _x(s, n, 2, 6, 6), "w": _x(s + 1, n, 3, 3, 3),
                                                "seq": _x(s + 2, n, 2, 7), "wseq": _x(s + 3, n, 3, 7),
                                                "vid": _x(s + 4, n, 1, 4, 4, 4)})]


def _state_cases() -> list[Case]:
    conv, bn, lin = Conv(2, 3, 4, 3), BatchNorm2d(4), Linear(4, 2)
    p = {"conv": conv.init(key=_k(15)), "bn": bn.init(key=None), "lin": lin.init(key=_k(16))}
    p["bn"] = pytree.tree_map(lambda t: t + 0.1 * pr.normal(_k(17), t.shape), p["bn"])
    state = {"running_mean": 0.1 * _x(1, 4), "running_var": 1 + 0.1 * _x(2, 4).abs(),
             "num_batches_tracked": torch.tensor(3)}

    def bloss(p, b):
        y, new = bn(p["bn"], conv(p["conv"], b["x"]), state, training=False)
        return _sq(lin(p["lin"], y.mean((2, 3))), b["y"]), new

    enc, cb, dec = Linear(3, 4), Codebook(5, 4), Linear(4, 3)
    q = {"enc": enc.init(key=_k(18)), "dec": dec.init(key=_k(19))}
    cstate = cb.init_state(key=_k(20)) | {"initialized": torch.tensor(True)}

    def closs(p, b):
        z = enc(p["enc"], b["x"]).transpose(1, 2)  # (B, 4, T): channel-first for the codebook
        out, new = cb({}, z, cstate, training=False)
        commit = ((out.encoded_flat - out.quantized_flat.detach()) ** 2).reshape(z.shape[0], -1).sum(1)
        return _sq(dec(p["dec"], out.quantized.transpose(1, 2)), b["x"]) + commit, new

    return [Case("batchnorm_eval", p, bloss, lambda n, s: {"x": _x(s, n, 3, 5, 5), "y": _x(s + 1, n, 2)}, has_aux=True),
            Case("codebook", q, closs, lambda n, s: {"x": _x(s, n, 6, 3)}, has_aux=True)]


def _attention_cases() -> list[Case]:
    self_attn, cross = MultiHeadAttention(8, 2), MultiHeadAttention(8, 2, dim_kv=6, dropout=0.2)
    p = {"self": self_attn.init(key=_k(21)), "cross": cross.init(key=_k(22))}

    def loss(p, b, key=None):
        h = self_attn(p["self"], b["x"], key_padding_mask=b["pad"]).output
        h = cross(p["cross"], h, b["m"], key=key).output
        return _sq(h, b["y"])

    enc = TransformerEncoder(TransformerEncoderLayer(8, 2, 16, dropout=0.1, activation="gelu", norm_first=True), 2,
                             final_norm=True)

    def eloss(p, b, key=None):
        return _sq(enc(p, b["x"], key=key).last_hidden_state, b["y"])

    def batch(n, s):
        pad = torch.zeros(n, 5, dtype=torch.bool)
        pad[:, -1] = pr.bernoulli(pr.key(s + 3), 0.5, (n,))
        return {"x": _x(s, n, 5, 8), "m": _x(s + 1, n, 4, 6), "y": _x(s + 2, n, 5, 8), "pad": pad}

    return [Case("attention", p, loss, batch, uses_key=True),
            Case("transformer", enc.init(key=_k(23)), eloss, lambda n, s: {"x": _x(s, n, 5, 8), "y": _x(s + 1, n, 5, 8)},
                 uses_key=True)]


def vit_parts(image: int = 16, patch: int = 4, width: int = 8, depth: int = 2, heads: int = 2, classes: int = 3,
              dropout: float = 0.0):
    """A small ViT classifier: PatchEmbedding (CLS + learned positions) -> pre-norm encoder -> head on CLS."""
    pe = PatchEmbedding(image_size=image, patch_size=patch, num_channels=3, hidden_size=width)
    enc = TransformerEncoder(TransformerEncoderLayer(width, heads, 2 * width, dropout=dropout, activation="gelu",
                                                     norm_first=True), depth, final_norm=True)
    return pe, enc, Linear(width, classes)


def vit_init(parts, key: torch.Tensor) -> dict:
    ks = pr.split(key, 3)
    params = {name: part.init(key=k) for name, part, k in zip(("embed", "encoder", "head"), parts, ks)}
    params["embed"]["cls_token"] = 0.02 * pr.normal(pr.fold_in(key, 7), params["embed"]["cls_token"].shape)
    return params


def vit_loss(parts):
    pe, enc, head = parts

    def loss(p, b, key=None):
        h = pe(p["embed"], b["image"]).embeddings
        h = enc(p["encoder"], h, key=key).last_hidden_state
        return F.cross_entropy(head(p["head"], h[:, 0]), b["label"], reduction="none")

    return loss


def _misc_cases() -> list[Case]:
    parts = vit_parts(dropout=0.1)
    vit = Case("vit", vit_init(parts, _k(24)), vit_loss(parts),
               lambda n, s: {"image": _x(s, n, 3, 16, 16), "label": pr.randint(pr.key(s), (n,), 0, 3)}, uses_key=True)
    lin = Linear(4, 5)
    p = {"lin": lin.init(key=_k(25)), "proj": pr.normal(_k(26), (5, 3)), "w2": pr.normal(_k(27), (3, 3)),
         "scale": torch.tensor(0.3), "pos": pr.normal(_k(28), (1, 2, 3))}

    def mixed(p, b):
        h = torch.einsum("btd,dk->btk", lin(p["lin"], b["x"]), p["proj"])  # einsum: vmap fallback
        h = F.linear(h, 2.0 * p["w2"]) + p["pos"]  # a derived weight, a broadcast parameter
        return _sq(p["scale"].exp() * h, b["y"])

    return [vit, Case("mixed", p, mixed, lambda n, s: {"x": _x(s, n, 2, 4), "y": _x(s + 1, n, 2, 3)},
                      fallback=("proj",))]


def cases() -> list[Case]:
    return (_linear_cases() + _embedding_cases() + _norm_cases() + _conv_cases() + _state_cases()
            + _attention_cases() + _misc_cases())


CASES = {c.name: c for c in cases()}


def losses_of(case: Case, params: dict, batch: Any, key: torch.Tensor | None = None) -> torch.Tensor:
    out = case.loss(params, batch) if key is None else case.loss(params, batch, key=key)
    return out[0] if case.has_aux else out


def loop_grads(case: Case, batch: Any, key: torch.Tensor | None = None, params: dict | None = None) -> dict:
    """Reference: ``{name: (B, *shape)}`` from ``torch.func.grad`` on each example alone (key ``fold_in(key, i)``)."""
    params = case.params if params is None else params
    n = next(iter(pytree.leaves(batch) if isinstance(batch, dict) else [batch])).shape[0]
    per = []
    for i in range(n):
        one = pytree.tree_map(lambda t: t[i:i + 1], batch)
        k = None if key is None else pr.fold_in(key, i)
        per.append(pytree.flatten(grad(lambda p: losses_of(case, p, one, k).sum())(params)))
    return {k: torch.stack([g[k] for g in per]) for k in per[0]}


@pytest.mark.parametrize("name", sorted(CASES))
def test_case_losses_are_per_example(name):
    case = CASES[name]
    b = case.batch(3, 0)
    full = losses_of(case, case.params, b)
    assert full.shape == (3,)
    one = losses_of(case, case.params, pytree.tree_map(lambda t: t[1:2], b))
    torch.testing.assert_close(one, full[1:2], rtol=1e-5, atol=1e-5)
