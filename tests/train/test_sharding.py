"""Sharded training (pytree DTensor route and fully_shard route) equals single-process training.

One spawn of 2 gloo CPU ranks runs every distributed scenario (the spawn dominates the cost);
each test then checks its scenario against a single-process AdamW run on the same global batch.
"""

from __future__ import annotations

import gc
import math
import time
import traceback
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torch.multiprocessing.reductions import StorageWeakRef

from polymodal.core import random as pr
from polymodal.core.encoders.swin3d import swin3d
from polymodal.core.layers import Embedding, Linear
from polymodal.core.layers.seam import run_layers, use_policy
from polymodal.core.layers.transformer import TransformerEncoder, TransformerEncoderLayer
from polymodal.core.losses.contrastive import contrastive_loss_with_temperature
from polymodal.core.pytree import flatten, leaves, num_bytes, tree_map
from polymodal.core.spec import Spec
from polymodal.train.policy import checkpoint_policy, training_policy
from polymodal.train.distributed import mean_over_ranks, mesh_from_env, run_ranks
from polymodal.train.distributed.sharding import (
    MixedPrecision, block_stacks, full_params, gather, gather_rest, local_bytes, shard_params,
)

STEPS, BATCH, LR = 3, 8, 1e-2


@dataclass(frozen=True)
class ToyClip(Spec):
    """Two small towers (odd widths: uneven shards) and a learned temperature; returns the contrastive loss."""

    width: int = 6  # model width
    ff: int = 9  # feed-forward width (odd: uneven shards)
    depth: int = 2  # blocks per tower
    d_in: int = 5  # image-feature width
    vocab: int = 11  # text vocabulary
    d_emb: int = 3  # joint embedding width

    def tower(self) -> TransformerEncoder:
        # bias=False: the key bias of attention has an exactly-zero gradient, whose rounding noise
        # Adam would amplify into lr-sized steps that differ between any two summation orders.
        layer = TransformerEncoderLayer(self.width, 2, self.ff, activation="gelu", norm_first=True, bias=False)
        return TransformerEncoder(layer, self.depth, final_norm=True)

    def block_stacks(self):
        return [f"{tower}.encoder.{s}" for tower in ("visual", "text") for s in self.tower().block_stacks()]

    def init(self, *, key):
        k = pr.split(key, 6)
        return {
            "visual": {"proj_in": Linear(self.d_in, self.width).init(key=k[0]), "encoder": self.tower().init(key=k[1]),
                       "proj": Linear(self.width, self.d_emb).init(key=k[2])},
            "text": {"embed": Embedding(self.vocab, self.width).init(key=k[3]), "encoder": self.tower().init(key=k[4]),
                     "proj": Linear(self.width, self.d_emb).init(key=k[5])},
            "logit_scale": torch.tensor(math.log(1 / 0.07)),
        }

    def __call__(self, params, images, tokens):
        v = Linear(self.d_in, self.width)(params["visual"]["proj_in"], images)
        v = self.tower()(params["visual"]["encoder"], v).last_hidden_state.mean(1)
        v = F.normalize(Linear(self.width, self.d_emb)(params["visual"]["proj"], v), dim=-1)
        t = Embedding(self.vocab, self.width)(params["text"]["embed"], tokens)
        t = self.tower()(params["text"]["encoder"], t).last_hidden_state[:, 0]
        t = F.normalize(Linear(self.width, self.d_emb)(params["text"]["proj"], t), dim=-1)
        return contrastive_loss_with_temperature(v, t, params["logit_scale"].float(), backprop_type="global").loss


def _setup():
    spec = ToyClip()
    params = spec.init(key=pr.key(0))
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(BATCH, 4, spec.d_in, generator=g), torch.randint(0, spec.vocab, (BATCH, 5), generator=g))
               for _ in range(STEPS)]
    return spec, params, batches


def _reference(spec, params, batches):
    params = tree_map(lambda t: t.clone().requires_grad_(), params)
    opt = torch.optim.AdamW(leaves(params), lr=LR)
    losses = []
    for images, tokens in batches:
        loss = spec(params, images, tokens)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, tree_map(lambda t: t.detach(), params)


# A tiny Swin3D classifier: two stages run through the seam, a patch-merging layer between them that does not.
SWIN = swin3d(patch_size=(2, 4, 4), embed_dim=4, depths=(2, 1), num_heads=(1, 2), window_size=(2, 2, 2),
              stochastic_depth_prob=0.0, num_classes=3)
SWIN_LR = 0.1


def _swin_setup():
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(BATCH, 3, 4, 16, 16, generator=g), torch.randint(0, 3, (BATCH,), generator=g))
               for _ in range(STEPS)]
    return SWIN.init(key=pr.key(1)), batches


def _swin_train(params, batches, loss_fn, rank=0, n=1):
    """SGD with momentum (Adam would amplify the rounding noise of the key biases' exactly-zero gradients)."""
    opt = torch.optim.SGD(leaves(params), lr=SWIN_LR, momentum=0.9)
    losses = []
    for video, labels in batches:
        b = video.shape[0] // n
        loss = loss_fn(params, video[rank * b:(rank + 1) * b], labels[rank * b:(rank + 1) * b])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append((mean_over_ranks(loss) if n > 1 else loss).item())
    return losses


def _swin_reference():
    params, batches = _swin_setup()
    params = tree_map(lambda t: t.clone().requires_grad_(), params)
    losses = _swin_train(params, batches, lambda p, v, y: F.cross_entropy(SWIN(p, v).logits, y))
    return losses, tree_map(lambda t: t.detach(), params)


# --------------------------------------------------------------------- in the ranks


def _swin_pytree_run(mesh, policy):
    params, batches = _swin_setup()
    sharded = shard_params(params, mesh)

    def loss_fn(p, video, labels):
        local = gather_rest(p, stacks=SWIN)  # the stages stay sharded; merges, embedding and head are gathered
        with use_policy(policy):
            return F.cross_entropy(SWIN(local, video).logits, labels)

    losses = _swin_train(sharded, batches, loss_fn, mesh.get_local_rank(), mesh.size())
    return losses, full_params(sharded), {}


def _swin_fsdp_run(mesh):
    from polymodal.core.pytree import unflatten
    from polymodal.nn.shell import Shell
    from polymodal.train.distributed.fsdp import fully_shard_shell

    params, batches = _swin_setup()
    shell = fully_shard_shell(Shell.from_params(SWIN, tree_map(torch.clone, params)), mesh)
    opt = torch.optim.SGD(shell.parameters(), lr=SWIN_LR, momentum=0.9)
    rank, n = mesh.get_local_rank(), mesh.size()
    losses = []
    for video, labels in batches:
        b = video.shape[0] // n
        loss = F.cross_entropy(shell(video[rank * b:(rank + 1) * b]).logits, labels[rank * b:(rank + 1) * b])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(mean_over_ranks(loss).item())
    full = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach() for k, v in shell.state_dict().items()}
    return losses, unflatten(full), {}


def _pytree_run(mesh, spec, params, batches, policy, mp=None):
    sharded = shard_params(params, mesh)
    opt = torch.optim.AdamW(leaves(sharded), lr=LR)
    rank, n = mesh.get_local_rank(), mesh.size()
    losses = []
    for images, tokens in batches:
        b = images.shape[0] // n
        local = gather_rest(sharded, mp, stacks=spec)
        images = images.to(mp.param_dtype) if mp else images
        with use_policy(policy):
            loss = spec(local, images[rank * b:(rank + 1) * b], tokens[rank * b:(rank + 1) * b])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(mean_over_ranks(loss).item())
    info = {"local_bytes": local_bytes(sharded), "optim_local_bytes": local_bytes(opt),
            "leaf_types": sorted({type(t).__name__ for t in leaves(sharded)}),
            "state_dtypes": sorted({str(v.dtype) for st in opt.state.values() for v in st.values() if v.dim()})}
    return losses, full_params(sharded), info


def _fsdp_run(mesh, spec, params, batches, policy=None, mp=None):
    from polymodal.nn.shell import Shell
    from polymodal.train.distributed.fsdp import fully_shard_shell

    shell = fully_shard_shell(Shell.from_params(spec, tree_map(torch.clone, params)), mesh, mp_policy=mp)
    opt = torch.optim.AdamW(shell.parameters(), lr=LR)
    rank, n = mesh.get_local_rank(), mesh.size()
    losses = []
    for images, tokens in batches:
        b = images.shape[0] // n
        with use_policy(policy or checkpoint_policy(0)):
            loss = shell(images[rank * b:(rank + 1) * b], tokens[rank * b:(rank + 1) * b])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(mean_over_ranks(loss).item())
    full = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach() for k, v in shell.state_dict().items()}
    from polymodal.core.pytree import unflatten
    return losses, unflatten(full), {"local_bytes": local_bytes(shell)}


def _without_redistribute_dtypes(run, *args):
    """Run as on a torch whose ``DTensor.redistribute`` has no forward_dtype/backward_dtype."""
    from polymodal.train.distributed import sharding

    saved, sharding._HAS_DTYPES = sharding._HAS_DTYPES, False
    try:
        return run(*args)
    finally:
        sharding._HAS_DTYPES = saved


BF16 = MixedPrecision(torch.bfloat16, torch.float32)
SCENARIOS = {
    "pytree": lambda m, s, p, b: _pytree_run(m, s, p, b, training_policy()),
    "pytree_ckpt": lambda m, s, p, b: _pytree_run(m, s, p, b, training_policy(checkpoint_every=1)),
    "pytree_ckpt_every2": lambda m, s, p, b: _pytree_run(m, s, p, b, training_policy(checkpoint_every=2)),
    "pytree_keep_gathered": lambda m, s, p, b: _pytree_run(m, s, p, b, training_policy(reshard_after_forward=False)),
    "pytree_bf16": lambda m, s, p, b: _pytree_run(m, s, p, b, training_policy(BF16, checkpoint_every=1), BF16),
    "pytree_bf16_cast_around": lambda m, s, p, b: _without_redistribute_dtypes(
        _pytree_run, m, s, p, b, training_policy(BF16), BF16),
    "fsdp": lambda m, s, p, b: _fsdp_run(m, s, p, b),
    "fsdp_ckpt": lambda m, s, p, b: _fsdp_run(m, s, p, b, checkpoint_policy(1)),
    "fsdp_bf16": lambda m, s, p, b: _fsdp_run(m, s, p, b, None, BF16),
    "swin3d": lambda m, s, p, b: _swin_pytree_run(m, training_policy()),
    "swin3d_ckpt": lambda m, s, p, b: _swin_pytree_run(m, training_policy(checkpoint_every=1)),
    "swin3d_fsdp": lambda m, s, p, b: _swin_fsdp_run(m),
}


def _alive_after_collectives(refs, patience_s=2.0):
    """How many storages in ``refs`` are alive once garbage is collected.

    The backend's record of the last all-gather (its output buffer) is released by the
    collective's worker thread a moment after the result is used, so a storage that no
    tensor references any more may outlive ``gc.collect()`` briefly; poll for it.
    """
    deadline = time.monotonic() + patience_s
    while True:
        gc.collect()
        alive = sum(not r.expired() for r in refs)
        if alive == 0 or time.monotonic() > deadline:
            return alive
        time.sleep(0.01)


def _liveness(mesh):
    """Per policy: how many gathered block params are alive between forward and backward, and the grads."""
    g = torch.Generator().manual_seed(0)
    blocks = [{"a": {"weight": torch.randn(7, 8, generator=g)}, "b": {"weight": torch.randn(8, 7, generator=g)}}
              for _ in range(3)]
    sharded = shard_params(blocks, mesh)
    x = torch.randn(4, 8, generator=g)
    out = {}
    policies = {"keep": training_policy(reshard_after_forward=False), "reshard": training_policy(),
                "ckpt": training_policy(checkpoint_every=1), "ckpt_every2": training_policy(checkpoint_every=2),
                "ckpt_keep": training_policy(checkpoint_every=1, reshard_after_forward=False)}
    for name, policy in policies.items():
        refs = []

        def block(i, p, h, k, e):
            refs.extend(StorageWeakRef(t.untyped_storage()) for t in leaves(p))
            return torch.tanh(h @ p["a"]["weight"].t()) @ p["b"]["weight"].t(), None

        with use_policy(policy):
            y, _ = run_layers(block, sharded, x)
        alive = _alive_after_collectives(refs, patience_s=0.0 if name == "keep" else 2.0)
        y.square().sum().backward()
        out[name] = (alive, len(refs), [t.grad.full_tensor() for t in leaves(sharded)])
        for t in leaves(sharded):
            t.grad = None
    return out


def _rank_all(mesh):
    spec, params, batches = _setup()
    out = {"mesh_size": mesh.size(), "mesh_device": mesh.device_type}
    try:
        out["liveness"] = _liveness(mesh)
    except Exception:
        out["liveness"] = traceback.format_exc()
    for name, run in SCENARIOS.items():
        try:
            out[name] = run(mesh, spec, params, batches)
        except Exception:  # recorded and raised by the scenario's test
            out[name] = traceback.format_exc()
    return out


@pytest.fixture(scope="module")
def ranks():
    return run_ranks(_rank_all, 2)


@pytest.fixture(scope="module")
def reference():
    spec, params, batches = _setup()
    return _reference(spec, params, batches)


def _result(ranks, name):
    for r in ranks:
        if isinstance(r[name], str):
            pytest.fail(f"scenario {name} failed on a rank:\n{r[name]}")
    return ranks[0][name]


def _assert_same_training(got, ref, atol=1e-5, loss_tol=1e-6, initial=None):
    losses, params, _ = got
    ref_losses, ref_params = ref
    assert losses == pytest.approx(ref_losses, abs=loss_tol, rel=0)
    a, b = flatten(params), flatten(ref_params)
    assert sorted(a) == sorted(b)
    for k in b:
        assert a[k].shape == b[k].shape, k
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=lambda m: f"{k}: {m}")
    initial = _setup()[1] if initial is None else initial
    assert any(not torch.equal(b[k], v) for k, v in flatten(initial).items()), "training changed nothing"


# --------------------------------------------------------------------- tests


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["pytree", "pytree_ckpt", "pytree_ckpt_every2", "pytree_keep_gathered",
                                  "fsdp", "fsdp_ckpt"])
def test_sharded_training_equals_single_process(ranks, reference, name):
    _assert_same_training(_result(ranks, name), reference)
    assert _result(ranks, name)[0] == _result(ranks[1:], name)[0]  # every rank saw the same global loss


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["swin3d", "swin3d_ckpt", "swin3d_fsdp"])
def test_sharded_swin3d_training_equals_single_process(ranks, name):
    # Swin3D's declared stacks are its stages: the patch-merging layer between them is gathered with the
    # rest (a guess from the tree's shape took it for a stack, and its DTensors reached plain ops).
    _assert_same_training(_result(ranks, name), _swin_reference(), initial=_swin_setup()[0])
    assert _result(ranks, name)[0] == _result(ranks[1:], name)[0]


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["pytree_bf16", "pytree_bf16_cast_around", "fsdp_bf16"])
def test_mixed_precision_close_to_fp32(ranks, reference, name):
    # bf16 compute (losses come back on bf16's grid: 1/32 at 4..8), fp32 master weights and reduction;
    # Adam's normalised steps (lr each) turn bf16 rounding of tiny gradients into up to ~2 lr of drift
    _assert_same_training(_result(ranks, name), reference, atol=5 * LR, loss_tol=0.05)


@pytest.mark.distributed
def test_master_weights_and_optimizer_state_stay_sharded_fp32(ranks):
    info = _result(ranks, "pytree_bf16")[2]
    assert info["leaf_types"] == ["DTensor"]
    assert info["state_dtypes"] == ["torch.float32"]


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["pytree", "fsdp"])
def test_each_rank_holds_about_half_the_parameter_bytes(ranks, name):
    total = num_bytes(_setup()[1])
    per_rank = [r[name][2]["local_bytes"] for r in ranks]
    scalar_bytes = 4  # logit_scale: replicated in the fully_shard route (FSDP2 refuses 0-d params)
    assert total <= sum(per_rank) <= total + scalar_bytes
    for b in per_rank:
        assert 0.4 * total <= b <= 0.6 * total, (b, total)


@pytest.mark.distributed
def test_optimizer_state_is_sharded(ranks):
    total = num_bytes(_setup()[1])
    per_rank = [r["pytree"][2]["optim_local_bytes"] for r in ranks]
    # exp_avg + exp_avg_sq sharded like the params, a step counter per leaf on each rank, and the
    # replicated (0-d) logit_scale's two moments held by both ranks
    n_leaves = len(flatten(_setup()[1]))
    assert sum(per_rank) == 2 * total + 2 * n_leaves * 4 + 2 * 4
    assert max(per_rank) < 0.6 * (2 * total)


@pytest.mark.distributed
def test_gathered_params_are_freed_between_forward_and_backward(ranks):
    live = _result(ranks, "liveness")
    # without resharding autograd keeps every gathered weight it needs (all but block 0's first:
    # its input x needs no gradient, so x @ a.T saves only x)
    assert live["keep"][:2] == (5, 6)
    for name in ("reshard", "ckpt", "ckpt_every2", "ckpt_keep"):
        assert live[name][0] == 0, name
    for name in ("reshard", "ckpt", "ckpt_every2", "ckpt_keep"):
        for a, b in zip(live[name][2], live["keep"][2]):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_mesh_from_env_names_missing_variables(monkeypatch):
    for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(v, raising=False)
    with pytest.raises(RuntimeError, match="missing .*RANK"):
        mesh_from_env()


def test_mesh_from_env_under_spawn(ranks):
    assert [(r["mesh_size"], r["mesh_device"]) for r in ranks] == [(2, "cpu"), (2, "cpu")]


def test_block_stacks_and_gather_rest_single_process():
    spec = ToyClip()
    params = spec.init(key=pr.key(0))
    assert block_stacks(spec, params) == ["visual.encoder.layers", "text.encoder.layers"]
    # without a mesh: plain leaves pass through, cast by the policy's dtype
    out = gather_rest(params, MixedPrecision(torch.float64), stacks=spec)
    assert out["visual"]["proj"]["weight"].dtype == torch.float64
    assert out["visual"]["encoder"]["layers"] is params["visual"]["encoder"]["layers"]
    with pytest.raises(KeyError, match=r"\['visual.nope'\] are not lists in params"):
        gather_rest(params, stacks=["visual.nope"])
    with pytest.raises(KeyError, match="not lists"):
        gather_rest(params, stacks=["visual.proj"])  # a dict, not a list of blocks
    with pytest.raises(TypeError, match="stacks: expected the spec"):
        gather_rest(params)
    assert gather({"w": torch.ones(2)})["w"].dtype == torch.float32


def test_mixed_precision_validates_dtypes():
    with pytest.raises(TypeError, match="param_dtype: expected a floating torch.dtype"):
        MixedPrecision(torch.int32)
    with pytest.raises(TypeError, match="DeviceMesh"):
        shard_params({"w": torch.ones(2)}, "cpu")
