"""JAX interoperability beyond parameter trees (needs the optional ``jax`` dependency).

Three routes between a polymodal (torch) function and JAX:

* :func:`to_jax_function` (the **bridge**): any pure function ``fn(params, *inputs)`` becomes a
  JAX function; torch runs it, by DLPack eagerly and by ``jax.pure_callback`` under ``jax.jit``,
  with the backward from ``torch.func.vjp`` through ``jax.custom_vjp``. Works for everything
  torch can run; the computation stays on torch's side of the fence (host round trips under jit).
* :func:`export_to_jax` (the **translation**): ``torch.export`` the function, then translate the
  ATen graph op by op into ``jax.numpy`` / ``jax.lax``: a pure JAX function that ``jit``,
  ``grad`` and ``vmap`` transform natively and XLA compiles. Covers the core's operator set
  (:func:`translated_ops`: every core layer, CLIP, Swin3D and the BERT family's encoders, BERT /
  RoBERTa / DistilBERT, translate); anything else raises :class:`UnsupportedOpError` naming the op.
* :func:`from_jax_function` (the other way): a JAX function (a JAX loss, an optax update)
  becomes a torch function with JAX's gradient, usable under ``torch.func.grad`` and ``vmap``.

Parameter trees themselves cross with ``polymodal.core.pytree.to_jax`` / ``from_jax`` (DLPack);
:func:`tree_to_torch` / :func:`tree_to_jax` move any JAX pytree (an optax state's NamedTuples).
Keys cross as data (:func:`key_to_jax`, :func:`key_from_jax`); 64-bit leaves need
``jax.config.update("jax_enable_x64", True)`` and raise a ``TypeError`` naming the fix otherwise.

>>> import jax, jax.numpy as jnp, torch
>>> from polymodal.core import pytree, random as pr
>>> from polymodal.core.layers import Linear
>>> lin = Linear(3, 2)
>>> params = lin.init(key=pr.key(0))
>>> loss = lambda f: (lambda p, x: jnp.sum(f(p, x) ** 2))
>>> g_bridge = jax.grad(loss(to_jax_function(lin)))(pytree.to_jax(params), jnp.ones((4, 3)))
>>> g_native = jax.jit(jax.grad(loss(export_to_jax(lin, (params, torch.ones(4, 3))))))(
...     pytree.to_jax(params), jnp.ones((4, 3)))
>>> bool(jnp.allclose(g_bridge["weight"], g_native["weight"], atol=1e-5))
True
"""

from __future__ import annotations

try:
    import jax as _jax  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised only without the optional dependency
    raise ImportError("polymodal.interop.jax needs JAX: pip install 'polymodal[jax]' (or pip install jax)") from e

from .jax_arrays import key_from_jax, key_to_jax, tree_to_jax, tree_to_torch
from .jax_bridge import to_jax_function
from .jax_export import UnsupportedOpError, export_to_jax, translated_ops
from .jax_wrap import from_jax_function

__all__ = ["to_jax_function", "from_jax_function", "export_to_jax", "UnsupportedOpError", "translated_ops",
           "key_to_jax", "key_from_jax", "tree_to_jax", "tree_to_torch"]
