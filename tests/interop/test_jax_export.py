"""``export_to_jax``: every core layer spec, Swin3D, the BERT family's encoders (BERT with a mask and
token types, RoBERTa, DistilBERT; small width) and CLIP tiny give torch's
outputs and gradients in JAX (float32, 1e-5); jit / vmap / retracing; training under jit with
optax; the errors for an unsupported op, 64-bit values and mis-structured arguments."""

from __future__ import annotations

import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.utils._pytree as tpt  # noqa: E402

from jax_cases import encoder_cases, layer_cases  # noqa: E402
from jax_testing import assert_tree_close, clip_loss_jax, clip_loss_torch, optax_steps, to_j  # noqa: E402
from polymodal.core import pytree  # noqa: E402
from polymodal.core import random as pr  # noqa: E402
from polymodal.core.layers import MLP, Linear  # noqa: E402
from polymodal.interop.jax import UnsupportedOpError, export_to_jax  # noqa: E402

CASES = layer_cases() + encoder_cases()


def _leaves(tree) -> list:
    return [x for x in tpt.tree_leaves(tree) if x is not None]


def _weights(outs: list) -> list:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(o.shape, generator=g) if o.is_floating_point() else None for o in outs]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_spec_gives_torch_outputs_and_gradients(case):
    """Outputs within 1e-5; gradients of a weighted sum of the outputs within 1e-5 relative to the
    gradient's scale (float32 sums in another order). Forward and gradient run under one jax.jit."""
    want = _leaves(case.fn(*case.args))
    jfn = export_to_jax(case.fn, case.args)
    jargs = to_j(case.args)
    argnums = tuple(i for i, a in enumerate(case.args[:2]) if _leaves(a) and all(
        isinstance(t, torch.Tensor) and t.is_floating_point() for t in _leaves(a)))
    weights = _weights(want)
    differentiable = argnums and any(w is not None for w in weights)

    def loss_j(*args):
        outs = _leaves(jfn(*args))
        return sum((jnp.sum(o * to_j(w)) for o, w in zip(outs, weights) if w is not None), jnp.zeros(())), outs

    if differentiable:
        (_, got), got_g = jax.jit(jax.value_and_grad(loss_j, argnums=argnums, has_aux=True))(*jargs)
    else:
        got = jax.jit(loss_j)(*jargs)[1]
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(torch.from_numpy(np.array(g)).to(w.dtype), w, atol=1e-5, rtol=1e-5)
    if not differentiable:
        return

    def loss_t(*args):
        return sum((o * w).sum() for o, w in zip(_leaves(case.fn(*args)), weights) if w is not None)

    want_g = torch.func.grad(loss_t, argnums=argnums)(*case.args)
    scale = max(1.0, max(float(t.abs().max()) for t in _leaves(want_g) if t.numel()))
    assert_tree_close(list(got_g), list(want_g), atol=1e-5 * scale)


def test_translated_clip_tiny_matches_torch_and_trains_under_jit_with_optax(clip_tiny):
    clip, params, images, tokens, _, want = clip_tiny
    jclip = export_to_jax(lambda p, i, t: clip(p, i, t), (params, images, tokens))
    i, t = to_j((images, tokens))

    def loss(p):
        out = jclip(p, i, t)
        return clip_loss_jax(out), out

    p, values, (out, grads) = optax_steps(loss, optax.adamw(2e-3, weight_decay=0.1), pytree.to_jax(params), 6)
    assert type(out).__name__ == "CLIPOutput"  # the first step's forward and gradient are torch's
    assert_tree_close(list(out), list(clip(params, images, tokens)))
    assert_tree_close(grads, want)
    losses = [float(v) for v in values]
    assert losses[-1] < 0.5 * losses[0], losses
    assert float(clip_loss_torch(clip(pytree.from_jax(p), images, tokens))) < losses[0]  # back in torch


def test_vmap_jit_and_retracing_for_new_shapes():
    mlp = MLP(6, 3, hidden_dims=(8,), activation="gelu")
    params = mlp.init(key=pr.key(1))
    x = torch.randn(4, 3, 6, generator=torch.Generator().manual_seed(1))
    jmlp = export_to_jax(mlp, (params, x[0]))
    jp = pytree.to_jax(params)
    per_example = jax.jit(jax.vmap(jax.grad(lambda p, x: jnp.sum(jmlp(p, x) ** 2)), in_axes=(None, 0)))
    want = torch.func.vmap(torch.func.grad(lambda p, x: mlp(p, x).square().sum()), in_dims=(None, 0))(params, x)
    assert_tree_close(per_example(jp, to_j(x)), want)
    assert_tree_close({"y": jmlp(jp, to_j(x[0, :2]))}, {"y": mlp(params, x[0, :2])})  # exported again for (2, 6)
    strict = export_to_jax(mlp, (params, x[0]), retrace=False)
    with pytest.raises(ValueError, match=r"inputs of shapes .*\(2, 6\).* differ from the exported .*\(3, 6\)"):
        strict(jp, to_j(x[0, :2]))


def test_unsupported_op_is_named():
    with pytest.raises(UnsupportedOpError, match=r"aten\.cumprod\.default \(x1\).*to_jax_function"):
        export_to_jax(lambda p, x: torch.cumprod(x * p["s"], 0), ({"s": torch.ones(())}, torch.ones(3)))


def test_float64_values_need_x64():
    fn = lambda p, x: (x.double() * p["s"]).sum()  # noqa: E731
    jfn = export_to_jax(fn, ({"s": torch.ones(())}, torch.ones(3)))
    with pytest.raises(TypeError, match="jax_enable_x64"):
        jfn({"s": jnp.ones(())}, jnp.ones(3))
    with jax.enable_x64(True):
        out = export_to_jax(fn, ({"s": torch.ones(())}, torch.ones(3)))({"s": jnp.ones(())}, jnp.arange(3.0))
        assert out.dtype == jnp.float64 and float(out) == 3.0


def test_keyed_dropout_translates_with_x64_and_names_the_fix_without():
    mlp = MLP(6, 3, hidden_dims=(8,), dropout=0.5)
    params, x, k = mlp.init(key=pr.key(3)), torch.randn(4, 6, generator=torch.Generator().manual_seed(4)), pr.key(5)
    fn = lambda p, x, k: mlp(p, x, key=k)  # noqa: E731
    jfn = export_to_jax(fn, (params, x, k))
    with jax.enable_x64(True):  # keys are int64 words: their arithmetic needs 64-bit integers
        out = jfn(pytree.to_jax(params), to_j(x), jnp.asarray(k.numpy()))
        torch.testing.assert_close(torch.from_numpy(np.array(out)), fn(params, x, k), atol=1e-6, rtol=1e-6)
    with pytest.raises(TypeError, match="needs 64-bit integers.*jax_enable_x64"):
        jfn(pytree.to_jax(params), to_j(x), jnp.asarray(k.numpy()))


def test_misstructured_arguments_are_named():
    lin = Linear(3, 2)
    params = lin.init(key=pr.key(2))
    jfn = export_to_jax(lin, (params, torch.ones(2, 3)))
    with pytest.raises(ValueError, match="expected arguments structured as"):
        jfn({"weight": jnp.ones((2, 3))}, jnp.ones((2, 3)))
