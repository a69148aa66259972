"""Interoperability with other frameworks, beyond parameter trees.

* :mod:`polymodal.interop.jax`: polymodal functions inside JAX programs (a callback bridge
  with ``jax.custom_vjp``, or a native translation of the exported graph into ``jax.numpy``),
  and JAX functions inside torch. Needs the optional ``jax`` dependency
  (``pip install polymodal[jax]``); this package imports without it.
"""
