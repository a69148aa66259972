"""Contrastive loss with temperature: TorchMultimodal parity, properties, 2-rank gloo numerics."""

import datetime
import math
import os
import socket
import tempfile
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torchmultimodal.modules.losses import contrastive_loss_with_temperature as tmm
from torchmultimodal.utils.distributed import BackpropType

from checks import check_spec, copy_into
from polymodal import nn as pnn
from polymodal.core import random as pr
from polymodal.core.losses import ContrastiveLoss, ContrastiveLossOutput, contrastive_loss_with_temperature

seeds = st.integers(0, 2**32)
FIELDS = ContrastiveLossOutput._fields


def emb(seed, *shape, normalize=True):
    x = pr.normal(pr.key(seed), shape)
    return F.normalize(x, dim=-1) if normalize else x


def mask_of(seed, b):
    m = pr.bernoulli(pr.key(seed), 0.6, (b,))
    return m.clone().index_fill_(0, torch.tensor([0]), True)  # at least one counted row


def grads(fn, *xs):
    xs = [x.detach().clone().requires_grad_() for x in xs]
    out = fn(*xs)
    out.loss.backward()
    return out, [x.grad for x in xs]


ce_kwargs = st.sampled_from([None, {"label_smoothing": 0.1}, {"reduction": "sum"}, "weight", "weight+smooth"])


def make_ce(choice, n, seed):
    if not isinstance(choice, str):
        return choice
    w = pr.uniform(pr.key(seed), (n,), low=0.5, high=2.0)
    return {"weight": w} if choice == "weight" else {"weight": w, "label_smoothing": 0.2}


@given(st.integers(1, 8), st.integers(1, 6), st.floats(-1.0, 5.0), st.booleans(), ce_kwargs, seeds)
def test_function_parity_with_torchmultimodal(b, d, scale, use_mask, ce, seed):
    a, bb = emb(seed, b, d), emb(seed + 1, b, d, normalize=False)
    s = torch.tensor(scale)
    mask = mask_of(seed + 2, b) if use_mask else None
    ce = make_ce(ce, b, seed + 3)
    ours, g_ours = grads(lambda a, bb, s: contrastive_loss_with_temperature(
        a, bb, s, mask=mask, cross_entropy_kwargs=ce), a, bb, s)
    ref, g_ref = grads(lambda a, bb, s: tmm.contrastive_loss_with_temperature(
        a, bb, s, mask=mask, cross_entropy_kwargs=ce), a, bb, s)
    if mask is None:  # same ops in the same order: identical
        for f in FIELDS:
            torch.testing.assert_close(getattr(ours, f), getattr(ref, f), rtol=0, atol=0, msg=f)
    else:  # masked rows stay in our logits; the loss is the same mean by another route
        torch.testing.assert_close(ours.logits_a[mask], ref.logits_a, rtol=0, atol=0)
        torch.testing.assert_close(ours.logits_b[mask], ref.logits_b, rtol=0, atol=0)
        for f in ("loss", "loss_a", "loss_b"):
            torch.testing.assert_close(getattr(ours, f), getattr(ref, f), rtol=1e-5, atol=1e-6, msg=f)
    for go, gr in zip(g_ours, g_ref):
        torch.testing.assert_close(go, gr, rtol=1e-5, atol=1e-6)


@given(st.integers(1, 8), st.integers(1, 6), st.sampled_from([math.log(1 / 0.07), -0.5, 5.0, 2.0]),
       st.sampled_from([(0.0, math.log(100)), (None, math.log(50)), (0.5, None)]), st.booleans(), seeds)
def test_spec_and_shell_parity_with_module(b, d, init, bounds, use_mask, seed):
    lo, hi = bounds
    spec = ContrastiveLoss(init, lo, hi)
    p = spec.init(key=pr.key(seed))
    a, bb = emb(seed, b, d), emb(seed + 1, b, d)
    mask = mask_of(seed + 2, b) if use_mask else None
    ref = tmm.ContrastiveLossWithTemperature(init, lo, hi)
    copy_into(ref, p)
    ar, br = a.clone().requires_grad_(), bb.clone().requires_grad_()
    loss_ref = ref(ar, br, mask=mask)  # clamps ref.logit_scale in place, then differentiates at that value
    loss_ref.backward()
    shell = pnn.ContrastiveLoss(init, lo, hi)
    assert sorted(shell.state_dict()) == sorted(ref.state_dict()) == ["logit_scale"]
    ash, bsh = a.clone().requires_grad_(), bb.clone().requires_grad_()
    out = shell(ash, bsh, mask=mask)
    out.loss.backward()
    torch.testing.assert_close(out.loss, loss_ref, rtol=1e-6, atol=1e-6)
    for ours, theirs in ((shell.logit_scale.grad, ref.logit_scale.grad), (ash.grad, ar.grad), (bsh.grad, br.grad)):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert torch.equal(shell.logit_scale.detach(), torch.tensor(init))  # the stored value is not clamped in place
    kwargs = {"mask": mask} if use_mask else {}
    check_spec(spec, p, [a, bb], kwargs, compile=seed % 3 == 0,
               vmap_inputs=[emb(seed + 4, 2, b, d), emb(seed + 5, 2, b, d)])


@given(st.integers(1, 8), st.integers(1, 6), st.floats(-1.0, 4.0), st.booleans(), seeds)
def test_symmetric_in_swapping_a_and_b(b, d, scale, use_mask, seed):
    a, bb = emb(seed, b, d), emb(seed + 1, b, d)
    mask = mask_of(seed + 2, b) if use_mask else None
    ab = contrastive_loss_with_temperature(a, bb, torch.tensor(scale), mask=mask)
    ba = contrastive_loss_with_temperature(bb, a, torch.tensor(scale), mask=mask)
    torch.testing.assert_close(ab.logits_a, ba.logits_b, rtol=0, atol=0)
    torch.testing.assert_close(ab.logits_b, ba.logits_a, rtol=0, atol=0)
    torch.testing.assert_close(ab.loss_a, ba.loss_b, rtol=0, atol=0)
    torch.testing.assert_close(ab.loss, ba.loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(ab.logits_a, ab.logits_b.T, rtol=1e-6, atol=1e-6)  # a.b^T vs b.a^T


@given(st.integers(1, 8), st.integers(0, 4), seeds)
def test_perfect_alignment_at_large_scale_gives_zero_loss(b, extra, seed):
    q, _ = torch.linalg.qr(pr.normal(pr.key(seed), (b + extra, b + extra)).double())
    a = q[:b].float()  # orthonormal rows: cosine 1 with the partner, 0 with the rest
    out = contrastive_loss_with_temperature(a, a.clone(), math.log(1000.0))
    assert float(out.loss) < 1e-6
    torch.testing.assert_close(out.logits_a.argmax(1), torch.arange(b))
    at_one = contrastive_loss_with_temperature(a, a.clone(), 0.0)  # scale 1: log(1 + (b-1)/e) per row
    torch.testing.assert_close(at_one.loss, torch.tensor(math.log(1 + (b - 1) / math.e)), rtol=1e-5, atol=1e-6)


def test_errors():
    a = torch.ones(4, 3)
    with pytest.raises(ValueError, match=r"emb_b: expected shape \(4, 3\) \(as emb_a\), got \(4, 2\)"):
        contrastive_loss_with_temperature(a, torch.ones(4, 2), 0.0)
    with pytest.raises(ValueError, match=r"emb_a: expected shape \(B, D\), got \(4,\)"):
        contrastive_loss_with_temperature(torch.ones(4), torch.ones(4), 0.0)
    with pytest.raises(ValueError, match=r"mask: expected shape \(4,\), got \(3,\)"):
        contrastive_loss_with_temperature(a, a, 0.0, mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="expected backprop_type in"):
        contrastive_loss_with_temperature(a, a, 0.0, backprop_type="everywhere")
    with pytest.raises(ValueError, match="logit_scale_min <= logit_scale_max"):
        ContrastiveLoss(0.0, 2.0, 1.0)
    # TorchMultimodal's enum is accepted too.
    out = contrastive_loss_with_temperature(a, a, 0.0, backprop_type=BackpropType.LOCAL)
    assert out.loss.shape == ()


# ---------------------------------------------------------------------------------------------
# Two gloo ranks: each holds half of a batch.

W, B, D = 2, 3, 4
MODES = ("global", "local", "none")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_worker(rank, port, out_dir, a_full, b_full, scale, masks):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=W,
                            timeout=datetime.timedelta(seconds=60))
    warnings.simplefilter("ignore", FutureWarning)  # TMM's deprecated all_gather
    spec = ContrastiveLoss()
    results = {}
    try:
        for mode in MODES:
            for use_mask in (False, True):
                mask = masks[rank] if use_mask else None
                a = a_full[rank * B:(rank + 1) * B].clone().requires_grad_()
                b = b_full[rank * B:(rank + 1) * B].clone().requires_grad_()
                s = scale.clone().requires_grad_()
                out = spec({"logit_scale": s}, a, b, mask=mask, backprop_type=mode)
                out.loss.backward()
                ar, br, sr = (t.detach().clone().requires_grad_() for t in (a, b, scale))
                ref = tmm.contrastive_loss_with_temperature(ar, br, sr, mask=mask, backprop_type=BackpropType[mode.upper()])
                ref.loss.backward()
                results[mode, use_mask] = {
                    "loss": out.loss.detach(), "logits_a": out.logits_a.detach(), "grads": (a.grad, b.grad, s.grad),
                    "tmm_loss": ref.loss.detach(), "tmm_grads": (ar.grad, br.grad, sr.grad),
                }
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _single_process_rank_loss(a_full, b_full, scale, rank, mode, mask):
    """Rank ``rank``'s loss computed in one process, with the gather's gradient rule as detaches."""
    def blocks(x):  # "global": all blocks live; "local": only this rank's; "none": none
        return torch.cat([p if mode == "global" or (mode == "local" and i == rank) else p.detach()
                          for i, p in enumerate(x.split(B))])
    a_r, b_r = a_full[rank * B:(rank + 1) * B], b_full[rank * B:(rank + 1) * B]
    t = torch.exp(scale)
    logits_a = a_r @ blocks(b_full).T * t
    logits_b = b_r @ blocks(a_full).T * t
    labels = rank * B + torch.arange(B)
    keep = torch.ones(B, dtype=torch.bool) if mask is None else mask
    return (F.cross_entropy(logits_a[keep], labels[keep]) + F.cross_entropy(logits_b[keep], labels[keep])) / 2, logits_a


@pytest.mark.distributed
def test_two_rank_gloo_matches_single_process():
    a_full, b_full = emb(0, W * B, D), emb(1, W * B, D)
    scale = torch.tensor(math.log(10.0))
    masks = [torch.tensor([True, False, True]), torch.tensor([False, True, True])]
    with tempfile.TemporaryDirectory() as out_dir:
        torch.multiprocessing.spawn(_rank_worker, args=(_free_port(), out_dir, a_full, b_full, scale, masks),
                                    nprocs=W, join=True)
        res = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(W)]

    # Global, no mask: the DDP identities. mean_r loss_r == full-batch loss; the gradient each rank
    # gets for its embeddings is W x its slice of the full-batch gradient (the gather's backward
    # sums all ranks' contributions); the logit_scale gradient averaged over ranks (what DDP does
    # to a replicated parameter) is the full-batch one.
    af, bf, sf = (t.clone().requires_grad_() for t in (a_full, b_full, scale))
    full = contrastive_loss_with_temperature(af, bf, sf)
    full.loss.backward()
    glob = [r["global", False] for r in res]
    torch.testing.assert_close(sum(r["loss"] for r in glob) / W, full.loss.detach())
    for r in range(W):
        rows = slice(r * B, (r + 1) * B)
        torch.testing.assert_close(glob[r]["logits_a"], full.logits_a.detach()[rows])
        torch.testing.assert_close(glob[r]["grads"][0], W * af.grad[rows])
        torch.testing.assert_close(glob[r]["grads"][1], W * bf.grad[rows])
    torch.testing.assert_close(sum(r["grads"][2] for r in glob) / W, sf.grad)

    # Every mode, with and without a mask: each rank equals its single-process counterpart
    # (the gather's gradient rule written as detaches) and TorchMultimodal on the same ranks.
    for mode in MODES:
        for use_mask in (False, True):
            af, bf, sf = (t.clone().requires_grad_() for t in (a_full, b_full, scale))
            per_rank = [_single_process_rank_loss(af, bf, sf, r, mode, masks[r] if use_mask else None)[0]
                        for r in range(W)]
            for r in range(W):
                got = res[r][mode, use_mask]
                torch.testing.assert_close(got["loss"], per_rank[r].detach(), msg=f"{mode} {use_mask} loss")
                torch.testing.assert_close(got["loss"], got["tmm_loss"], msg=f"{mode} {use_mask} tmm loss")
                for ours, theirs in zip(got["grads"], got["tmm_grads"]):
                    torch.testing.assert_close(ours, theirs, msg=f"{mode} {use_mask} tmm grad")
            # Rank r's embeddings get their slice of d(sum_r' loss_r')/d(emb): with "global" every
            # rank's loss reaches them; with "local"/"none" the detaches leave only rank r's own.
            ga, gb = torch.autograd.grad(sum(per_rank), [af, bf])
            for r in range(W):
                got, rows = res[r][mode, use_mask]["grads"], slice(r * B, (r + 1) * B)
                torch.testing.assert_close(got[0], ga[rows], msg=f"{mode} {use_mask} grad a rank {r}")
                torch.testing.assert_close(got[1], gb[rows], msg=f"{mode} {use_mask} grad b rank {r}")
    # The modes really differ in their gradients (and agree in their losses).
    g = {m: res[0][m, False]["grads"][0] for m in MODES}
    assert not torch.allclose(g["global"], g["local"]) and not torch.allclose(g["local"], g["none"])
    torch.testing.assert_close(res[0]["none", False]["loss"], res[0]["global", False]["loss"])
