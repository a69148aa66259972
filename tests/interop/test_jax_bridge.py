"""The bridge (``to_jax_function``): polymodal functions under jax.grad / jit / vmap, optax training,
dtypes, keys, and the errors for bad input. References are torch.func on the same torch code."""

from __future__ import annotations

import subprocess
import sys

import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from jax_cases import BERT_SMALL, bert_inputs  # noqa: E402
from jax_testing import assert_tree_close, clip_loss_jax, clip_loss_torch, optax_steps, to_j  # noqa: E402
from polymodal.core import pytree  # noqa: E402
from polymodal.core import random as pr  # noqa: E402
from polymodal.core.layers import MLP, Dropout  # noqa: E402
from polymodal.interop.jax import key_from_jax, key_to_jax, to_jax_function  # noqa: E402
from polymodal.models.bert import bert_base_uncased  # noqa: E402


def test_grad_through_bert_encoder_equals_torch_func_grad():
    # A real BERT encoder (bert_base_uncased's layout, 2 layers x 32 wide) with an attention mask and
    # token types; the loss weighs both outputs (last_hidden_state and the tanh pooler). jax.grad
    # eagerly and under jit (CLIP's jitted gradient: test_jit_grad_and_optax_adamw_train_tiny_clip_from_jax).
    enc = bert_base_uncased(**BERT_SMALL)
    params = enc.init(key=pr.key(1))
    ids, mask, types = bert_inputs()
    g = torch.Generator().manual_seed(2)
    w, v = torch.randn(2, 6, 32, generator=g), torch.randn(2, 32, generator=g)

    def loss_t(p):
        out = enc(p, ids, mask, types)
        return (out.last_hidden_state * w).sum() + (out.pooled * v).sum()

    want = torch.func.grad(loss_t)(params)
    jenc = to_jax_function(lambda p, i, m, t: enc(p, i, m, t))

    def loss(p, i, m, t):
        out = jenc(p, i, m, t)  # a BERTOutput of JAX arrays
        return jnp.sum(out.last_hidden_state * to_j(w)) + jnp.sum(out.pooled * to_j(v))

    args = (pytree.to_jax(params), *to_j((ids, mask, types)))
    assert_tree_close(jax.grad(loss)(*args), want)
    value, grads = jax.jit(jax.value_and_grad(loss))(*args)
    assert_tree_close(grads, want)
    np.testing.assert_allclose(float(value), float(loss_t(params)), rtol=1e-5)


@pytest.mark.parametrize("strategy", ["batched", "loop"])
def test_vmap_of_grad_gives_per_example_gradients(strategy):
    mlp = MLP(6, 3, hidden_dims=(8,), activation="gelu")
    params = mlp.init(key=pr.key(2))
    x = torch.randn(5, 4, 6, generator=torch.Generator().manual_seed(3))
    want = torch.func.vmap(torch.func.grad(lambda p, x: mlp(p, x).square().sum()), in_dims=(None, 0))(params, x)
    jmlp = to_jax_function(mlp, vmap=strategy)
    per_example = jax.vmap(jax.grad(lambda p, x: jnp.sum(jmlp(p, x) ** 2)), in_axes=(None, 0))
    assert_tree_close(per_example(pytree.to_jax(params), to_j(x)), want)
    assert_tree_close(jax.jit(per_example)(pytree.to_jax(params), to_j(x)), want)
    out = jax.vmap(jmlp, in_axes=(None, 0))(pytree.to_jax(params), to_j(x))
    assert_tree_close({"y": out}, {"y": mlp(params, x)})


def test_jit_grad_and_optax_adamw_train_tiny_clip_from_jax(clip_tiny):
    clip, params, images, tokens, want_loss, want = clip_tiny
    jclip = to_jax_function(lambda p, i, t: clip(p, i, t))
    i, t = to_j((images, tokens))
    loss = lambda p: (clip_loss_jax(jclip(p, i, t)), None)  # noqa: E731
    p, values, (_, grads) = optax_steps(loss, optax.adamw(2e-3, weight_decay=0.1), pytree.to_jax(params), 6)
    np.testing.assert_allclose(float(values[0]), want_loss, rtol=1e-6)  # under jit, the first step's loss
    assert_tree_close(grads, want)  # and gradient are torch's
    losses = [float(v) for v in values]
    assert losses[-1] < 0.5 * losses[0], losses
    back = pytree.from_jax(p)  # the trained params are polymodal params again
    assert float(clip_loss_torch(clip(back, images, tokens))) < losses[0]


def test_keys_cross_as_data():
    drop = Dropout(0.5)
    x = torch.ones(3, 8)
    k = pr.key(7)
    jdrop = to_jax_function(lambda p, x, k: drop(p, x, key=k))
    np.testing.assert_array_equal(np.asarray(jdrop({}, to_j(x), key_to_jax(k))), drop({}, x, key=k).numpy())
    jk = jax.random.key(3)  # a typed JAX key is read through its key data
    np.testing.assert_array_equal(np.asarray(jdrop({}, to_j(x), jk)), drop({}, x, key=key_from_jax(jk)).numpy())
    keys = pr.split(k, 4)  # vmap over keys: one draw per key
    batched = jax.vmap(jdrop, in_axes=(None, None, 0))({}, to_j(x), key_to_jax(keys))
    np.testing.assert_array_equal(np.asarray(batched), torch.stack([drop({}, x, key=kk) for kk in keys]).numpy())


def test_bfloat16_leaves_are_differentiated_in_bfloat16():
    mlp = MLP(6, 3, hidden_dims=(8,), activation="gelu")
    params = pytree.cast(mlp.init(key=pr.key(4)), torch.bfloat16)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(5)).bfloat16()
    want = torch.func.grad(lambda p: mlp(p, x).float().square().sum())(params)
    jmlp = to_jax_function(mlp)
    loss = lambda p, x: jnp.sum(jmlp(p, x).astype(jnp.float32) ** 2)  # noqa: E731
    for f in (jax.grad(loss), jax.jit(jax.grad(loss))):
        got = f(pytree.to_jax(params), jnp.asarray(x.float().numpy()).astype(jnp.bfloat16))
        assert all(g.dtype == jnp.bfloat16 for g in jax.tree_util.tree_leaves(got))
        assert_tree_close(got, want, atol=0, rtol=0)  # the same torch computation, in bfloat16


def test_float64_needs_x64_and_works_with_it():
    f = to_jax_function(lambda p, x: (x.double() * p["s"]).sum())
    with pytest.raises(TypeError, match=r"output 0 is torch.float64.*jax_enable_x64"):
        f({"s": jnp.ones(())}, jnp.ones(3))
    with jax.enable_x64(True):
        g = to_jax_function(lambda p, x: (x * p["s"]).sum())
        x = np.linspace(0, 1, 5)
        grad = jax.jit(jax.grad(g))({"s": jnp.asarray(2.0, jnp.float64)}, jnp.asarray(x))
        assert grad["s"].dtype == jnp.float64
        np.testing.assert_allclose(float(grad["s"]), x.sum(), rtol=1e-15)


def test_outputs_changing_shape_between_calls_are_named():
    calls = []

    def grows(p, x):
        calls.append(1)
        return x[: len(calls)]

    f = to_jax_function(grows)
    with pytest.raises(ValueError, match=r"output 0 changed between calls.*expected torch.float32 \(1,\)"):
        f({}, jnp.ones(4))
    with pytest.raises(Exception, match="changed between calls"):  # under jit, from inside the callback
        jax.block_until_ready(jax.jit(to_jax_function(grows))({}, jnp.ones(5)))


def test_value_dependent_shapes_are_refused():
    f = to_jax_function(lambda p, x: x[x > 0])
    with pytest.raises(ValueError, match="output shapes depend on input values"):
        f({}, jnp.ones(3))


def test_polymodal_imports_without_jax():
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'jax' or name.startswith('jax.'): raise ImportError('no jax here')\n"
            "sys.meta_path.insert(0, Block())\n"
            "import polymodal, polymodal.interop, polymodal.core.pytree, polymodal.models.clip\n"
            "try:\n"
            "    import polymodal.interop.jax\n"
            "except ImportError as e:\n"
            "    print('ImportError:', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "pip install 'polymodal[jax]'" in out.stdout


def test_value_checks_work_again_after_the_bridge_traced_shapes():
    # The shape pass runs on fake tensors with torch's compiling flag set (value checks stand aside);
    # the flag is process-wide, so it must be restored: after a jitted bridge call an out-of-range id
    # is still the clear error, not an IndexError (a leak once broke the BERT tests of the same worker).
    from polymodal.core.layers import Embedding

    emb = Embedding(8, 4)
    p = emb.init(key=pr.key(0))
    f = to_jax_function(lambda q, ids: emb(q, ids))
    jax.jit(f)(to_j(p), jnp.zeros((2,), dtype=jnp.int32))
    with pytest.raises(ValueError, match=r"vocabulary size is 8"):
        emb(p, torch.tensor([9]))
