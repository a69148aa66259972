"""Helpers shared by the JAX interop tests: tree conversion, the CLIP loss on both sides, comparisons, optax steps."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils._pytree as tpt

import jax
import jax.numpy as jnp
import optax

from polymodal.core import pytree


def to_j(tree):
    """Tensors -> JAX arrays (int64 -> int32: JAX's default integers without x64)."""
    def conv(t):
        if not isinstance(t, torch.Tensor):
            return t
        a = t.detach().numpy()
        return jnp.asarray(a.astype(np.int32) if a.dtype == np.int64 else a)
    return tpt.tree_map(conv, tree)


def clip_loss_torch(out) -> torch.Tensor:
    """Symmetric InfoNCE, written directly (the reference)."""
    logits = out.logit_scale.exp() * out.image_embeddings @ out.text_embeddings.T
    labels = torch.arange(logits.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def clip_loss_jax(out) -> jax.Array:
    logits = jnp.exp(out.logit_scale) * out.image_embeddings @ out.text_embeddings.T
    labels = jnp.arange(logits.shape[0])
    ce = optax.softmax_cross_entropy_with_integer_labels
    return (ce(logits, labels).mean() + ce(logits.T, labels).mean()) / 2


def assert_tree_close(jax_tree, torch_tree, atol: float = 1e-5, rtol: float = 1e-5) -> None:
    """Same keys, each leaf within tolerance (JAX leaves compared in float64 on the host)."""
    got = pytree.flatten(jax.tree_util.tree_map(lambda a: torch.from_numpy(np.asarray(a, np.float64)), jax_tree))
    want = {k: v.detach().double() for k, v in pytree.flatten(torch_tree).items()}
    assert sorted(got) == sorted(want), (sorted(got), sorted(want))
    for k in want:  # numpy's check is torch.testing's rule (|got - want| <= atol + rtol |want|), without its cost
        if got[k].shape != want[k].shape or not np.allclose(got[k].numpy(), want[k].numpy(), rtol=rtol, atol=atol):
            torch.testing.assert_close(got[k], want[k], atol=atol, rtol=rtol, msg=lambda m: f"{k}: {m}")


def optax_steps(loss, opt, params, steps: int):
    """``steps`` updates of ``opt`` on ``loss(p) -> (value, aux)`` as one jitted ``lax.scan``: one XLA
    compile (a Python loop of a jitted step compiles twice). Returns the trained params, each step's
    loss ``(steps,)`` and the first step's ``(aux, grads)`` (kept in the carry, not stacked per step)."""
    def step(carry, n):
        p, state, first = carry
        (value, aux), grads = jax.value_and_grad(loss, has_aux=True)(p)
        updates, state = opt.update(grads, state, p)
        first = jax.tree_util.tree_map(lambda old, new: jnp.where(n == 0, new, old), first, (aux, grads))
        return (optax.apply_updates(p, updates), state, first), value

    def run(p):
        first = jax.tree_util.tree_map(jnp.zeros_like, jax.eval_shape(lambda p: (loss(p)[1], p), p))
        (p, _, first), values = jax.lax.scan(step, (p, opt.init(p), first), jnp.arange(steps))
        return p, values, first

    return jax.jit(run)(params)
