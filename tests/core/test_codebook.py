"""Codebook (VQ with EMA state) and commitment loss: TorchMultimodal parity, properties, transforms."""

import os
import tempfile

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.func import grad, vmap
from torchmultimodal.modules.layers.codebook import Codebook as TMMCodebook
from torchmultimodal.modules.losses.vqvae import CommitmentLoss

from checks import assert_close, check_compile
from polymodal import nn as pnn
from polymodal.core import pytree
from polymodal.core import random as pr
from polymodal.core.layers import Codebook, CodebookOutput
from polymodal.core.losses import commitment_loss

seeds = st.integers(0, 2**32)
spatial = st.lists(st.integers(1, 3), min_size=0, max_size=3).map(tuple)


def x_of(seed, *shape):
    return pr.normal(pr.key(seed), shape)


def ready_state(spec, seed):
    """An initialised state with non-trivial statistics."""
    k, d = spec.num_embeddings, spec.embedding_dim
    return {
        "embedding": x_of(seed, k, d),
        "code_usage": pr.uniform(pr.key(seed + 1), (k,), low=0.5, high=3.0),
        "code_avg": x_of(seed + 2, k, d),
        "initialized": torch.tensor(True),
    }


def tmm_with(spec, state):
    ref = TMMCodebook(spec.num_embeddings, spec.embedding_dim, spec.decay, spec.usage_threshold, spec.epsilon)
    ref.load_state_dict({k: v.clone() for k, v in state.items() if k != "initialized"})  # sets _is_embedding_init
    assert ref._is_embedding_init
    return ref


def sq_dist(enc, emb):
    return ((enc.double()[:, None, :] - emb.double()[None]) ** 2).sum(-1)


@given(st.integers(1, 12), st.integers(1, 6), st.integers(1, 3), spatial, seeds)
def test_eval_parity_with_torchmultimodal(k, d, b, sp, seed):
    spec = Codebook(k, d)
    state = ready_state(spec, seed)
    z = x_of(seed + 3, b, d, *sp)
    out, new_state = spec({}, z, state)
    assert new_state is state
    ref = tmm_with(spec, state).eval()(z)
    for name in CodebookOutput._fields:
        torch.testing.assert_close(getattr(out, name), getattr(ref, name), rtol=0, atol=0, msg=name)
    idx = pr.randint(pr.key(seed + 4), (b, 3), 0, k)
    torch.testing.assert_close(spec.lookup(state, idx), tmm_with(spec, state).lookup(idx), rtol=0, atol=0)


@given(st.integers(1, 10), st.integers(1, 5), st.sampled_from([0.0, 0.5, 0.99]), spatial, seeds)
def test_training_ema_parity_with_torchmultimodal(k, d, decay, sp, seed):
    # usage_threshold=0: no restarts, so TorchMultimodal's global-RNG draw never reaches the output.
    spec = Codebook(k, d, decay=decay, usage_threshold=0.0)
    state = ready_state(spec, seed)
    ref = tmm_with(spec, state).train()
    for step in range(3):
        z = x_of(seed + 10 + step, 2, d, *sp)
        out, state = spec({}, z, state, training=True, key=pr.key(step))
        ref_out = ref(z)
        for name in CodebookOutput._fields:
            torch.testing.assert_close(getattr(out, name), getattr(ref_out, name), rtol=0, atol=0, msg=name)
        for name in ("embedding", "code_usage", "code_avg"):
            torch.testing.assert_close(state[name], getattr(ref, name).detach(), rtol=1e-6, atol=1e-6, msg=name)
        assert bool(state["initialized"])


def test_restart_semantics_match_torchmultimodal():
    # Restarts draw different random vectors (TMM: global RNG, here: the key); which codes restart,
    # the kept codes and the pool they are drawn from agree.
    spec = Codebook(8, 3, decay=0.5, usage_threshold=1.0)
    state = ready_state(spec, 0)
    state["code_usage"] = torch.tensor([4.0, 0.1, 3.0, 0.2, 5.0, 0.1, 2.0, 0.3])
    z = x_of(7, 4, 3, 5)  # 20 encoder vectors >= 8 codes: restarts are exact encoder rows
    out, new = spec({}, z, state, training=True, key=pr.key(1))
    ref = tmm_with(spec, state).train()
    ref(z)
    alive = ref.code_usage >= 1.0
    assert 0 < int(alive.sum()) < 8
    torch.testing.assert_close(new["code_usage"] >= 1.0, alive)
    torch.testing.assert_close(new["embedding"][alive], ref.embedding[alive].detach(), rtol=1e-6, atol=1e-6)
    for row in new["embedding"][~alive]:
        assert (out.encoded_flat == row).all(-1).any()


@given(st.integers(1, 20), st.integers(1, 6), st.integers(1, 20), seeds)
def test_picks_argmin_distance_ties_to_lowest(k, d, n, seed):
    spec = Codebook(k, d)
    state = ready_state(spec, seed)
    if k > 1:  # a duplicated code: the later copy must never win
        state["embedding"] = state["embedding"].clone()
        state["embedding"][k - 1] = state["embedding"][0]
    z = x_of(seed + 5, n, d)
    out, _ = spec({}, z, state)
    dist = sq_dist(out.encoded_flat, state["embedding"])
    chosen = dist.gather(1, out.codebook_indices.reshape(-1, 1)).squeeze(1)
    assert torch.all(chosen <= dist.min(1).values + 1e-5)
    if k > 1:
        assert not (out.codebook_indices == k - 1).any()
    torch.testing.assert_close(out.quantized_flat, state["embedding"][out.codebook_indices.reshape(-1)])


@given(st.integers(1, 10), st.integers(1, 5), st.floats(0.0, 1.0), st.integers(1, 12), seeds)
def test_ema_update_equals_direct_computation(k, d, decay, n, seed):
    spec = Codebook(k, d, decay=decay, usage_threshold=0.0, epsilon=1e-3)
    state = ready_state(spec, seed)
    z = x_of(seed + 5, n, d)
    out, new = spec({}, z, state, training=True, key=pr.key(seed))
    enc, idx = out.encoded_flat.double(), out.codebook_indices
    usage, avg = state["code_usage"].double().clone(), state["code_avg"].double().clone()
    for j in range(k):
        members = enc[idx == j]
        usage[j] = decay * usage[j] + (1 - decay) * len(members)
        avg[j] = decay * avg[j] + (1 - decay) * members.sum(0)
    total = usage.sum()
    usage = (usage + 1e-3) / (total + k * 1e-3) * total  # Laplace smoothing
    torch.testing.assert_close(new["code_usage"].double(), usage, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(new["code_avg"].double(), avg, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(new["embedding"].double(), avg / usage[:, None], rtol=1e-4, atol=1e-4)


@given(st.integers(1, 8), st.integers(1, 4), spatial, st.booleans(), seeds)
def test_straight_through_gradient_is_identity(k, d, sp, training, seed):
    spec = Codebook(k, d)
    state = ready_state(spec, seed)
    z = x_of(seed + 1, 2, d, *sp)
    w = x_of(seed + 2, 2, d, *sp)
    key = pr.key(seed) if training else None
    g = grad(lambda z: (spec({}, z, state, training=training, key=key)[0].quantized * w).sum())(z)
    torch.testing.assert_close(g, w, rtol=0, atol=0)
    zz = z.clone().requires_grad_()
    out, new = spec({}, zz, state, training=training, key=key)
    (out.quantized_flat * w.movedim(1, -1).reshape(-1, d)).sum().backward()
    torch.testing.assert_close(zz.grad, w, rtol=0, atol=0)
    assert not any(t.requires_grad for t in new.values())  # the state carries no gradient


@given(st.integers(1, 12), st.integers(1, 5), st.integers(1, 20), seeds)
def test_lazy_init_from_first_training_batch(k, d, n, seed):
    spec = Codebook(k, d, decay=1.0, usage_threshold=0.0)  # decay 1: the step keeps the init values
    state = spec.init_state(key=pr.key(seed))
    assert not bool(state["initialized"])
    z = x_of(seed + 1, n, d)
    out, new = spec({}, z, state, training=True, key=pr.key(seed + 2))
    assert bool(new["initialized"]) and not bool(state["initialized"])
    enc = out.encoded_flat
    dist = sq_dist(new["embedding"], enc)  # every code is an encoder vector (jittered when n < k)
    assert torch.all(dist.min(1).values <= (1e-10 if n >= k else 25 * 0.01**2 * 4))
    torch.testing.assert_close(new["code_avg"], new["embedding"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(new["code_usage"], torch.ones(k), rtol=1e-5, atol=1e-6)
    if n >= k:  # k distinct encoder vectors, and the batch is quantised with them already:
        picked = dist.argmin(1)  # vectors picked as codes quantise to themselves
        assert torch.unique(picked).numel() == k
        torch.testing.assert_close(out.quantized_flat[picked], enc[picked], rtol=0, atol=0)
    again, _ = spec({}, z, state, training=True, key=pr.key(seed + 2))
    torch.testing.assert_close(again.codebook_indices, out.codebook_indices)
    # An initialised state is never re-initialised.
    _, newer = spec({}, z, new, training=True, key=pr.key(seed + 3))
    torch.testing.assert_close(newer["code_avg"], new["code_avg"], rtol=0, atol=0)


def test_dead_code_restart_is_deterministic_per_key():
    spec = Codebook(6, 3, usage_threshold=1e9)  # every code is dead
    state = ready_state(spec, 0)
    z = x_of(1, 2, 3, 4)  # 8 encoder vectors
    _, a = spec({}, z, state, training=True, key=pr.key(5))
    _, b = spec({}, z, state, training=True, key=pr.key(5))
    _, c = spec({}, z, state, training=True, key=pr.key(6))
    assert_close(a, b, 0, 0)
    assert not torch.equal(a["embedding"], c["embedding"])
    enc = z.movedim(1, -1).reshape(-1, 3)
    for row in a["embedding"]:  # each restart is a distinct encoder vector
        assert (enc == row).all(-1).sum() == 1
    assert torch.unique(a["embedding"], dim=0).shape[0] == 6


def test_vmap_and_compile_and_roundtrip():
    spec = Codebook(7, 4)
    state = ready_state(spec, 0)
    zs = x_of(1, 3, 2, 4, 3)  # vmap over 3 batches of (2, 4, 3)
    batched = vmap(lambda z: spec({}, z, state)[0])(zs)
    for i in range(3):
        one = spec({}, zs[i], state)[0]
        for name in CodebookOutput._fields:
            torch.testing.assert_close(getattr(batched, name)[i], getattr(one, name), rtol=0, atol=0)
    check_compile(spec, {}, [zs[0]], {"state": state})
    with tempfile.TemporaryDirectory() as tmp:  # the state is a plain pytree: safetensors round trip
        pytree.save(os.path.join(tmp, "s.safetensors"), state)
        loaded = pytree.load(os.path.join(tmp, "s.safetensors"), like=state)
    assert_close(loaded, state, 0, 0)
    assert_close(spec({}, zs[0], loaded)[0]._asdict(), spec({}, zs[0], state)[0]._asdict(), 0, 0)
    # Training compiles without graph breaks, too (lazy-init where + EMA + restart).
    torch._dynamo.reset()
    fresh = spec.init_state()
    f = torch.compile(lambda z, s, k: spec({}, z, s, training=True, key=k), fullgraph=True, backend="aot_eager")
    for s in (fresh, state):
        (o1, s1), (o2, s2) = f(zs[0], s, pr.key(3)), spec({}, zs[0], s, training=True, key=pr.key(3))
        assert_close(o1._asdict(), o2._asdict(), msg="compiled training")
        assert_close(s1, s2, msg="compiled training state")


def test_shell_writes_state_back_and_loads_tmm_state_dict():
    spec = Codebook(5, 3, usage_threshold=0.0)
    m = pnn.Codebook(5, 3, usage_threshold=0.0)
    assert sorted(m.state_dict()) == ["code_avg", "code_usage", "embedding", "initialized"]
    assert list(m.parameters()) == []
    z = x_of(0, 2, 3, 4)
    m.train()
    out = m(z, key=pr.key(9))
    ref_out, ref_state = spec({}, z, spec.init_state(), training=True, key=pr.key(9))
    assert_close(out._asdict(), ref_out._asdict(), 0, 0)
    assert_close(m.state, ref_state, 0, 0)
    m(z)  # the shell draws its own key in training
    assert bool(m.initialized)
    # A TorchMultimodal state dict loads with the one flag added; eval outputs then agree.
    ref = TMMCodebook(5, 3).eval()
    m.load_state_dict({**ref.state_dict(), "initialized": torch.tensor(True)})
    m.eval()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    torch.testing.assert_close(m(z).quantized, ref(z).quantized, rtol=0, atol=0)
    assert_close(dict(m.state_dict()), before, 0, 0)  # eval leaves the state alone


def test_errors():
    spec = Codebook(4, 3)
    s = spec.init_state()
    with pytest.raises(ValueError, match=r"Codebook: z: expected shape \(B, 3, \*spatial\), got \(2, 4, 5\)"):
        spec({}, torch.ones(2, 4, 5), s)
    with pytest.raises(ValueError, match="training=True needs a key"):
        spec({}, torch.ones(2, 3, 5), s, training=True)
    with pytest.raises(ValueError, match=r"state: expected keys .*got \['embedding'\]"):
        spec({}, torch.ones(2, 3, 5), {"embedding": s["embedding"]})
    with pytest.raises(ValueError, match=r"state\['embedding'\]: expected shape \(4, 3\), got \(4, 2\)"):
        spec({}, torch.ones(2, 3, 5), {**s, "embedding": torch.ones(4, 2)})
    with pytest.raises(TypeError, match="expected dtype"):
        spec.lookup(s, torch.ones(2))
    with pytest.raises(ValueError, match="decay"):
        Codebook(4, 3, decay=1.5)


@given(st.floats(0.0, 2.0), spatial, seeds)
def test_commitment_loss_matches_torchmultimodal(beta, sp, seed):
    q, e = x_of(seed, 2, 3, *sp), x_of(seed + 1, 2, 3, *sp).requires_grad_()
    ours = commitment_loss(q, e, beta=beta)
    ref = CommitmentLoss(commitment_cost=beta)(q, e)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    qq = q.clone().requires_grad_()
    commitment_loss(qq, e, beta).backward()
    assert qq.grad is None  # only the encoder side gets a gradient
    torch.testing.assert_close(e.grad, 2 * beta * (e - q).detach() / e.numel())
    with pytest.raises(ValueError, match=r"same shape, got \(2, 3\) and \(3, 2\)"):
        commitment_loss(torch.ones(2, 3), torch.ones(3, 2))
