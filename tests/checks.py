"""Generic per-spec checks every layer passes (the foundation issue's test contract).

``check_spec(spec, params, inputs, kwargs)`` runs:

* shell == spec (``polymodal.nn.Shell`` around the same params, eval mode);
* ``vmap`` over a leading batch axis == stacking per-example calls;
* ``torch.func.grad`` of a scalar loss == autograd through the shell;
* ``torch.compile(fullgraph=True)`` (no graph breaks) == eager;
* safetensors save/load round trip is exact and the reloaded params give the same output.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.func import grad, vmap

from polymodal.core import pytree
from polymodal.nn import Shell

ATOL, RTOL = 1e-6, 1e-5


def _first(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return _first(out[0])
    if hasattr(out, "_fields"):
        return _first(out[0])
    if hasattr(out, "__dataclass_fields__"):
        return _first(getattr(out, next(iter(out.__dataclass_fields__))))
    raise TypeError(f"cannot find a tensor output in {type(out)}")


def _loss(out: Any) -> torch.Tensor:
    y = _first(out)
    # A fixed non-uniform weighting so the gradient is not just a sum (cos of a ramp).
    w = torch.cos(torch.arange(y.numel(), dtype=y.dtype, device=y.device)).reshape(y.shape)
    return (y * w).sum()


def assert_close(a: Any, b: Any, atol: float = ATOL, rtol: float = RTOL, msg: str = "") -> None:
    fa = pytree.flatten(a) if isinstance(a, dict) else {"": a}
    fb = pytree.flatten(b) if isinstance(b, dict) else {"": b}
    assert fa.keys() == fb.keys(), f"{msg} keys differ: {sorted(fa)} vs {sorted(fb)}"
    for k in fa:
        torch.testing.assert_close(fa[k], fb[k], atol=atol, rtol=rtol, msg=lambda m: f"{msg} {k}: {m}")


def check_shell(spec, params, inputs: Sequence, kwargs: dict | None = None, atol=ATOL, rtol=RTOL) -> None:
    kwargs = kwargs or {}
    shell = Shell.from_params(spec, params).eval()
    assert sorted(shell.state_dict()) == sorted(pytree.flatten(params) | pytree.flatten(spec.init_state() or {})), (
        "state_dict keys must equal flatten(params)"
    )
    assert_close(_first(shell(*inputs, **kwargs)), _first(spec(params, *inputs, **kwargs)), atol, rtol, "shell")


def check_vmap(spec, params, inputs: Sequence, kwargs: dict | None = None, in_dims: Sequence[int | None] | None = None,
               atol=ATOL, rtol=RTOL) -> None:
    """``inputs`` carry a leading batch axis where ``in_dims`` is 0 (default: all)."""
    kwargs = kwargs or {}
    in_dims = tuple(in_dims) if in_dims is not None else (0,) * len(inputs)
    f = lambda *xs: _first(spec(params, *xs, **kwargs))  # noqa: E731
    batched = vmap(f, in_dims=in_dims)(*inputs)
    n = next(x.shape[0] for x, d in zip(inputs, in_dims) if d == 0)
    looped = torch.stack([f(*(x[i] if d == 0 else x for x, d in zip(inputs, in_dims))) for i in range(n)])
    assert_close(batched, looped, atol, rtol, "vmap vs loop")


def check_grad(spec, params, inputs: Sequence, kwargs: dict | None = None, atol=ATOL, rtol=RTOL) -> None:
    kwargs = kwargs or {}
    if not any(t.is_floating_point() for t in pytree.leaves(params)):
        return  # nothing to differentiate
    g_func = grad(lambda p: _loss(spec(p, *inputs, **kwargs)))(params)
    shell = Shell.from_params(spec, pytree.tree_map(lambda t: t.detach().clone(), params)).eval()
    _loss(shell(*inputs, **kwargs)).backward()
    g_shell = pytree.tree_map(
        lambda p: p.grad if p.grad is not None else torch.zeros_like(p),
        pytree.unflatten({k: v for k, v in shell.named_parameters()}),
    )
    g_func = pytree.unflatten({k: v for k, v in pytree.flatten(g_func).items() if v.is_floating_point()})
    assert_close(g_func, g_shell, atol, rtol, "grad vs shell autograd")


def check_compile(spec, params, inputs: Sequence, kwargs: dict | None = None, backend: str = "aot_eager",
                  atol=ATOL, rtol=RTOL) -> None:
    """fullgraph capture (no graph breaks) through dynamo + AOT autograd; ``backend="inductor"`` codegens too."""
    kwargs = kwargs or {}
    torch._dynamo.reset()
    f = torch.compile(lambda p, *xs: _first(spec(p, *xs, **kwargs)), fullgraph=True, backend=backend)
    assert_close(f(params, *inputs), _first(spec(params, *inputs, **kwargs)), atol, rtol, "compiled vs eager")


def check_roundtrip(spec, params, inputs: Sequence, kwargs: dict | None = None) -> None:
    kwargs = kwargs or {}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "p.safetensors")
        pytree.save(path, params)
        loaded = pytree.load(path, like=params)
    assert_close(loaded, params, 0, 0, "round trip")
    # Outputs within float tolerance only: BLAS kernels may take other paths for other alignments.
    assert_close(_first(spec(loaded, *inputs, **kwargs)), _first(spec(params, *inputs, **kwargs)), msg="reloaded output")


def check_spec(spec, params, inputs: Sequence, kwargs: dict | None = None, *, in_dims=None, compile: bool = True,
               grad_check: bool = True, vmap_inputs: Sequence | None = None, atol=ATOL, rtol=RTOL) -> None:
    """All generic checks; ``inputs`` must have a leading batch axis for the vmap check.

    ``vmap_inputs`` (default ``inputs``) are mapped over their first axis, for layers whose
    per-example input itself needs a batch axis (BatchNorm, GroupNorm).
    """
    check_shell(spec, params, inputs, kwargs, atol, rtol)
    check_vmap(spec, params, vmap_inputs if vmap_inputs is not None else inputs, kwargs, in_dims, atol, rtol)
    if grad_check:
        check_grad(spec, params, inputs, kwargs, atol, rtol)
    if compile:
        check_compile(spec, params, inputs, kwargs, atol=atol, rtol=rtol)
    check_roundtrip(spec, params, inputs, kwargs)


def copy_into(module: torch.nn.Module, params: dict, mapping: Callable[[str], str] | None = None) -> None:
    """Load our params into a reference ``nn.Module`` (strict), optionally renaming keys."""
    flat = pytree.flatten(params)
    if mapping is not None:
        flat = {mapping(k): v for k, v in flat.items()}
    missing, unexpected = module.load_state_dict(flat, strict=False)
    missing = [m for m in missing if "num_batches_tracked" not in m and "running_" not in m]
    assert not missing and not unexpected, f"missing {missing}, unexpected {unexpected}"


def randomize(params: dict, seed: int) -> dict:
    """``params`` with every leaf redrawn from ``N(0, 1)`` (matrices scaled by 0.3): non-trivial
    norms, biases and tokens, so a parity test cannot pass by accident of an init of ones/zeros."""
    from polymodal.core import random as pr

    flat = pytree.flatten(params)
    return pytree.unflatten({k: pr.normal(pr.key(seed + i), v.shape) * (0.3 if v.dim() > 1 else 1.0)
                             for i, (k, v) in enumerate(flat.items())})


def assert_reference_grads(leaves: dict, ref: torch.nn.Module, to_reference: Callable[[dict], dict], *,
                           atol: float = 1e-5, rtol: float = 1e-4) -> int:
    """Our leaves' ``.grad`` (None read as zeros), converted to the reference's names by ``to_reference``,
    equal each ``ref`` parameter's ``.grad``; returns how many reference parameters got a non-zero one."""
    grads = to_reference(pytree.unflatten({k: v.grad if v.grad is not None else torch.zeros_like(v)
                                           for k, v in leaves.items()}))
    nonzero = 0
    for k, p in ref.named_parameters():
        want = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(grads[k], want, atol=atol, rtol=rtol, msg=k)
        nonzero += int(want.abs().sum() > 0)
    return nonzero
