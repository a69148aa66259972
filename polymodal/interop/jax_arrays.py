"""Moving single arrays between torch and JAX: dtypes, DLPack, host buffers, keys, the x64 rule.

Shared by the bridge (:mod:`.jax_bridge`), the wrapper (:mod:`.jax_wrap`) and the translation
(:mod:`.jax_export`). Rules:

* float32 / float16 / bfloat16 / int8..int32 / uint8 / bool cross as they are (no copy through
  DLPack for device arrays; host buffers from ``jax.pure_callback`` are viewed, not copied).
* 64-bit types (float64, int64, complex128) exist in JAX only with ``jax_enable_x64``; without
  it a 64-bit leaf raises a ``TypeError`` naming the leaf and the fix instead of being narrowed.
* Random keys cross as data. A polymodal key is an ``int64`` tensor ``(..., 2)`` of two 32-bit
  words; in JAX it is the ``uint32`` array of the same words (:func:`key_to_jax`), and a typed
  JAX key (``jax.random.key``) is read through ``jax.random.key_data``. ``uint32`` leaves reach
  torch as ``int64`` (torch has no arithmetic on uint32), which is exactly a polymodal key.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from torch import Tensor

import jax
import jax.numpy as jnp

__all__ = ["tree_to_jax", "tree_to_torch", "TORCH_TO_JAX", "jax_dtype", "torch_dtype", "check_x64", "to_torch", "to_jax_array", "host_to_torch",
           "torch_to_host", "key_to_jax", "key_from_jax", "normalize_leaf", "is_float"]

TORCH_TO_JAX = {
    torch.float32: jnp.float32, torch.float64: jnp.float64, torch.float16: jnp.float16,
    torch.bfloat16: jnp.bfloat16, torch.int8: jnp.int8, torch.int16: jnp.int16, torch.int32: jnp.int32,
    torch.int64: jnp.int64, torch.uint8: jnp.uint8, torch.bool: jnp.bool_, torch.complex64: jnp.complex64,
    torch.complex128: jnp.complex128,
}
_JAX_TO_TORCH = {np.dtype(v): k for k, v in TORCH_TO_JAX.items()}
_JAX_TO_TORCH[np.dtype(np.uint32)] = torch.int64  # key words (see the module docstring)
_WIDE = (torch.float64, torch.int64, torch.complex128)
_X64_FIX = "enable 64-bit types in JAX (jax.config.update('jax_enable_x64', True)) or cast to 32 bits first"


def jax_dtype(dtype: torch.dtype) -> Any:
    """The JAX dtype of a torch dtype (``TypeError`` for one JAX cannot hold)."""
    if dtype not in TORCH_TO_JAX:
        raise TypeError(f"torch dtype {dtype} has no JAX counterpart; expected one of {sorted(map(str, TORCH_TO_JAX))}")
    return TORCH_TO_JAX[dtype]


def torch_dtype(dtype: Any) -> torch.dtype:
    """The torch dtype a JAX dtype arrives as (``uint32`` -> ``int64``: key words)."""
    d = np.dtype(dtype)
    if d not in _JAX_TO_TORCH:
        raise TypeError(f"JAX dtype {d} has no torch counterpart; expected one of {sorted(map(str, _JAX_TO_TORCH))}")
    return _JAX_TO_TORCH[d]


def check_x64(dtype: torch.dtype, what: str) -> None:
    """Raise if ``dtype`` is 64-bit while JAX runs without ``jax_enable_x64`` (JAX would narrow it)."""
    if dtype in _WIDE and not jax.config.jax_enable_x64:
        raise TypeError(f"{what} is {dtype}, but JAX has 64-bit types disabled and would narrow it to 32 bits; "
                        f"{_X64_FIX}")


def is_float(dtype: Any) -> bool:
    """Whether a (torch or JAX) dtype is floating point: those leaves are differentiated."""
    if isinstance(dtype, torch.dtype):
        return dtype.is_floating_point
    return jnp.issubdtype(dtype, jnp.floating)


def key_to_jax(k: Tensor) -> jax.Array:
    """A polymodal key ``int64 (..., 2)`` as JAX ``uint32 (..., 2)`` data (no x64 needed)."""
    if not isinstance(k, Tensor) or k.dtype != torch.int64 or k.shape[-1:] != (2,):
        got = f"{k.dtype} {tuple(k.shape)}" if isinstance(k, Tensor) else type(k).__name__
        raise TypeError(f"key_to_jax: expected a polymodal key (int64 tensor (..., 2)), got {got}")
    return jnp.asarray(k.detach().cpu().to(torch.int32).numpy().view(np.uint32))


def key_from_jax(k: Any) -> Tensor:
    """A JAX key (typed ``jax.random.key`` or ``uint32 (..., 2)`` words) as a polymodal ``int64`` key."""
    k = normalize_leaf(k)
    if np.dtype(k.dtype) != np.uint32 or k.shape[-1:] != (2,):
        raise TypeError(f"key_from_jax: expected a threefry key or uint32 words (..., 2), got {k.dtype} {k.shape}")
    return torch.from_numpy(np.asarray(k).astype(np.int64))


def normalize_leaf(x: Any) -> Any:
    """Typed JAX keys become their ``uint32`` key data; Python scalars become arrays; else unchanged."""
    if isinstance(x, (jax.Array, jax.ShapeDtypeStruct)) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(x)
    if isinstance(x, (int, float, bool, np.ndarray, np.generic)):
        return jnp.asarray(x)
    return x


def to_torch(a: jax.Array) -> Tensor:
    """A concrete JAX array as a tensor through DLPack (shares memory; ``uint32`` becomes ``int64``)."""
    if np.dtype(a.dtype) == np.uint32:
        return torch.from_numpy(np.asarray(a).astype(np.int64))
    return torch.from_dlpack(a)


def to_jax_array(t: Tensor, what: str = "tensor") -> jax.Array:
    """A tensor as a JAX array through DLPack (shares memory where the device allows)."""
    check_x64(t.dtype, what)
    jax_dtype(t.dtype)
    return jax.dlpack.from_dlpack(t.detach().contiguous())


def host_to_torch(a: np.ndarray) -> Tensor:
    """A host buffer from ``jax.pure_callback`` as a tensor, without a copy (bfloat16 via a bit view).

    The buffer is read-only; the core never writes to its inputs, so the view is safe.
    """
    a = np.asarray(a)
    if a.dtype == np.uint32:
        return torch.from_numpy(a.astype(np.int64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "The given NumPy array is not writable"
        if a.dtype == jnp.bfloat16:
            return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(a)


def torch_to_host(t: Tensor, dtype: Any) -> np.ndarray:
    """A tensor as the host buffer ``jax.pure_callback`` expects (``dtype``: the declared JAX dtype)."""
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(jnp.bfloat16)
    a = t.numpy()
    return a if a.dtype == np.dtype(dtype) else a.astype(dtype)


def tree_to_jax(tree: Any) -> Any:
    """Every tensor in any pytree JAX knows (dicts, lists, NamedTuples such as optax states) as a JAX array."""
    return jax.tree_util.tree_map(lambda t: to_jax_array(t) if isinstance(t, Tensor) else t, tree)


def tree_to_torch(tree: Any) -> Any:
    """Every JAX array in a JAX pytree (e.g. an optax optimizer state) as a tensor, through DLPack."""
    return jax.tree_util.tree_map(lambda a: to_torch(a) if isinstance(a, jax.Array) else a, tree)
