"""``linear_kernel.linear``: oneDNN on CPU inference, ``F.linear`` everywhere else, the same function.

The fast path must equal ``F.linear`` + activation up to float rounding, be taken only where nothing but
rounding can tell (no gradient recorded, no ``torch.func`` transform, float32 CPU, big enough), and leave
autograd and ``vmap`` on the ops they always saw. Packed weights (decoding) must give the dense result.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from polymodal.core.layers import linear_kernel as lk
from polymodal.core.layers.activation import activation as get_activation

onednn = pytest.mark.skipif(not lk.available(), reason="this torch build has no oneDNN linear")
ACTS = [None, *sorted(lk.FUSED_ACTIVATIONS)]


def reference(x, w, b, act):
    y = F.linear(x, w, b)
    return y if act is None else get_activation(act)(y)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 300), k=st.integers(1, 200), n=st.integers(1, 200), lead=st.integers(0, 2),
       bias=st.sampled_from([None, "dense", "strided"]), act=st.sampled_from(ACTS), transpose=st.booleans(),
       seed=st.integers(0, 2**16))
def test_equals_f_linear_and_the_activation(rows, k, n, lead, bias, act, transpose, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (2,) * lead + (rows, k)
    x = torch.randn(shape, generator=g)
    if transpose and lead:  # a non-contiguous input
        x = torch.randn(shape[:-3] + (rows, 2, k), generator=g).transpose(-3, -2)
    w = torch.randn(n, k, generator=g) / k**0.5
    b = None if bias is None else torch.randn(2 * n, generator=g)[:: 2 if bias == "strided" else 1][:n]
    old = lk.MIN_MACS
    try:
        lk.MIN_MACS = 0  # every size on the fast path (where it applies)
        with torch.no_grad():
            assert lk.fast_path(x, w, b) == (lk.available() and (bias != "strided" or n == 1))  # strided: F.linear
            got = lk.linear(x, w, b, act)
    finally:
        lk.MIN_MACS = old
    torch.testing.assert_close(got, reference(x, w, b, act), rtol=1e-5, atol=1e-5)


@onednn
def test_fast_path_only_where_nothing_but_rounding_differs():
    x, w, b = torch.randn(64, 512), torch.randn(512, 512), torch.randn(512)
    assert x.numel() * w.shape[0] >= lk.MIN_MACS
    assert lk.fast_path(x, w, b)  # plain tensors, grad mode on, nothing requires grad
    assert not lk.fast_path(x[:1], w, b)  # under MIN_MACS multiply-adds: MKL's lower per-call cost wins
    pw, pb = torch.nn.Parameter(w), torch.nn.Parameter(b)  # the shells' weights
    assert not lk.fast_path(x, pw, pb)  # they require a gradient, and autograd records
    with torch.no_grad():
        assert lk.fast_path(x, pw, pb)
    assert not lk.fast_path(x.double(), w.double(), b.double())
    assert not lk.fast_path(x, w.t(), b)  # a non-contiguous weight
    assert not lk.fast_path(x, w, torch.randn(1024)[::2])  # a strided bias (oneDNN would read it densely)
    assert not lk.fast_path(x.requires_grad_(), w, b)  # autograd records: F.linear
    with torch.no_grad():
        assert lk.fast_path(x, w, b)
    x.requires_grad_(False)
    seen = []
    torch.func.vmap(lambda xi: seen.append(lk.fast_path(xi, w, b)) or xi)(x.expand(2, 64, 512))  # xi (64, 512)
    assert seen == [False]  # under a transform: F.linear, which has the batching rule
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts F.linear: the result is bf16
        assert not lk.fast_path(x, w, b) and lk.linear(x, w, b).dtype == torch.bfloat16
    with torch.no_grad():  # torch.jit.trace records aten::linear, not the oneDNN op (portable graphs, ONNX)
        graph = str(torch.jit.trace(lambda t: lk.linear(t, w, b, "gelu"), (x,)).graph)
    assert "aten::linear" in graph and "mkldnn" not in graph
    torch.backends.mkldnn.enabled, was = False, torch.backends.mkldnn.enabled
    try:
        assert not lk.fast_path(x, w, b)
    finally:
        torch.backends.mkldnn.enabled = was


def test_gradients_and_vmap_see_f_linear():
    x, w, b = torch.randn(64, 512, requires_grad=True), torch.randn(512, 512, requires_grad=True), torch.randn(512)
    y = lk.linear(x, w, b, "gelu")
    assert y.grad_fn is not None and "Gelu" in type(y.grad_fn).__name__
    gx, gw = torch.autograd.grad(y.square().sum(), (x, w))
    x2, w2 = x.detach().requires_grad_(), w.detach().requires_grad_()
    ex, ew = torch.autograd.grad(F.gelu(F.linear(x2, w2, b)).square().sum(), (x2, w2))
    torch.testing.assert_close((gx, gw), (ex, ew))
    per = torch.func.vmap(torch.func.grad(lambda xi: lk.linear(xi, w.detach(), b, "relu").sum()))(x.detach())
    torch.testing.assert_close(per, torch.func.vmap(torch.func.grad(lambda xi: F.relu(F.linear(xi, w.detach(), b)).sum()))(x.detach()))


@pytest.mark.parametrize("act", ACTS)
def test_packed_weights_give_the_dense_result(act):
    w, b = torch.randn(768, 256) / 16, torch.randn(768)
    p = lk.pack(w, rows=4)
    assert isinstance(p, lk.Packed) == lk.available()
    for x in (torch.randn(4, 256), torch.randn(3, 5, 256), torch.randn(1, 256)):
        with torch.no_grad():
            torch.testing.assert_close(lk.linear(x, p, b, act), reference(x, w, b, act), rtol=1e-5, atol=1e-5)
    # a gradient through a packed weight: the dense original (the packed copy is never differentiated)
    x, wd = torch.randn(4, 256, requires_grad=True), w.clone().requires_grad_()
    pd = lk.pack(wd, rows=4)
    lk.linear(x, pd, b).sum().backward()
    torch.testing.assert_close(wd.grad, torch.ones(4, 768).t() @ x.detach())


def test_small_weights_stay_dense_and_bad_activations_are_named():
    w = torch.randn(16, 8)
    assert lk.pack(w, rows=4) is w  # under MIN_PACK: a GEMV over it is faster on MKL
    wd = w.double().repeat(200, 200)
    assert lk.pack(wd, rows=4) is wd  # not float32: kept dense, however large
    assert isinstance(lk.pack(wd.float(), rows=4), lk.Packed) == lk.available()  # the same weight in float32
    with pytest.raises(ValueError, match="unknown activation 'swishy'; expected one of"):
        lk.linear(torch.randn(2, 8), w, None, "swishy")
    x, w = torch.randn(64, 512), torch.randn(512, 512) / 512**0.5  # on the fast path's sizes: unfused ones follow the GEMM
    for name in ("quick_gelu", "geglu", "identity"):
        with torch.no_grad():
            torch.testing.assert_close(lk.linear(x, w, None, name), reference(x, w, None, name), rtol=1e-5, atol=1e-5)


def _copies(scope):
    """The cache keys of the weights ``scope`` holds a oneDNN copy of (a weight's id; a view's base and place)."""
    return {k for k, entry in scope._cache.items() if entry[3] is not None}


@onednn
@pytest.mark.parametrize("act", ACTS)
def test_frozen_weights_reorder_once_and_give_the_dense_result(act):
    x, w, b = torch.randn(3, 40, 512), torch.randn(1024, 512) / 512**0.5, torch.randn(1024)
    scope = lk.frozen_weights()
    with torch.no_grad(), scope:
        first = lk.linear(x, w, b, act)
        assert not _copies(scope)  # the first call only notes the weight (one made per call never costs a reorder)
        second = lk.linear(x, w, b, act)
        (packed,) = [scope._cache[id(w)][3]]
        assert packed is not None and packed.layout == torch._mkldnn
        for rows in (1, 7, 300):  # one copy serves every batch size
            torch.testing.assert_close(lk.linear(x[0, :rows], w, b, act), reference(x[0, :rows], w, b, act),
                                       rtol=1e-5, atol=1e-5)
        assert scope._cache[id(w)][3] is packed
    for got in (first, second):
        torch.testing.assert_close(got, reference(x, w, b, act), rtol=1e-5, atol=1e-5)
    assert lk._FROZEN.get() is None  # the scope is left: linear is back to reordering per call


@onednn
def test_frozen_weights_see_changes_through_the_tensor():
    x, w = torch.randn(64, 512), torch.randn(512, 512) / 512**0.5
    with torch.no_grad(), lk.frozen_weights() as scope:
        for _ in range(2):
            lk.linear(x, w)
        assert id(w) in _copies(scope)
        w.mul_(-2.0)  # in place: the version counter moves, so the copy is stale and not used
        torch.testing.assert_close(lk.linear(x, w), x @ w.T, rtol=1e-5, atol=1e-5)
        opt = torch.optim.SGD([p := torch.nn.Parameter(w.clone())], lr=0.01)
        for _ in range(2):
            lk.linear(x, p)
        with torch.enable_grad():  # an optimizer step inside the scope (recorded grad: F.linear, no copy used)
            lk.linear(x, p).sum().backward()
        before = x @ p.detach().T
        opt.step()
        assert (x @ p.T - before).abs().max() > 0.1  # the step moves the outputs well past the tolerance
        torch.testing.assert_close(lk.linear(x, p), x @ p.T, rtol=1e-4, atol=1e-4)
        w2 = torch.randn(512, 512)
        w.set_(w2)  # new storage for the same tensor object
        torch.testing.assert_close(lk.linear(x, w), x @ w2.T, rtol=1e-4, atol=1e-4)
    with torch.inference_mode():  # an inference tensor has no version counter: it is never copied
        wi = torch.randn(512, 512)
        with lk.frozen_weights() as scope:
            for _ in range(3):
                torch.testing.assert_close(lk.linear(x, wi), x @ wi.T, rtol=1e-4, atol=1e-4)
            wi.mul_(2.0)
            torch.testing.assert_close(lk.linear(x, wi), x @ wi.T, rtol=1e-4, atol=1e-4)
        assert not scope._cache


@onednn
def test_frozen_weights_hold_no_weight_alive_and_nest():
    x = torch.randn(64, 512)
    outer, inner = lk.frozen_weights(), lk.frozen_weights()
    with torch.no_grad(), outer:
        w = torch.randn(512, 512)
        with inner:  # inside another scope, the outer one's copies serve
            lk.linear(x, w), lk.linear(x, w)
        assert id(w) in _copies(outer) and not inner._cache
        ref = __import__("weakref").ref(w)
        del w
        assert ref() is None and not outer._cache  # the entry went with its weight
    with torch.no_grad(), outer:  # entering again: the same copies
        w = torch.randn(512, 512)
        lk.linear(x, w), lk.linear(x, w)
    assert id(w) in _copies(outer)
    outer.clear()
    assert not outer._cache


def test_frozen_weights_leave_gradients_and_transforms_alone():
    x, w = torch.randn(64, 512), torch.randn(512, 512, requires_grad=True)
    with lk.frozen_weights() as scope:
        y = lk.linear(x, w)
        y.sum().backward()
        torch.testing.assert_close(w.grad, torch.ones(64, 512).t() @ x)
        xs = torch.randn(3, 64, 512)
        with torch.no_grad():
            got = torch.func.vmap(lambda xi: lk.linear(xi, w.detach()))(xs)
        torch.testing.assert_close(got, xs @ w.detach().T, rtol=1e-5, atol=1e-5)
    assert not scope._cache  # neither call took the fast path


@onednn
def test_pack_inside_frozen_weights_reuses_the_copy():
    w = torch.randn(768, 256)
    assert lk.pack(w, rows=4).packed is not lk.pack(w, rows=4).packed  # outside a scope: a new copy each time
    with lk.frozen_weights():
        first = lk.pack(w, rows=4)
        assert lk.pack(w, rows=4).packed is first.packed  # the scope's copy
        assert lk.pack(w, rows=1).packed is not first.packed  # another row count, another layout
        w.add_(1.0)  # a change the version counter sees: packed again, from the new values
        again = lk.pack(w, rows=4)
        assert again.packed is not first.packed
        x = torch.randn(4, 256)
        with torch.no_grad():
            torch.testing.assert_close(lk.linear(x, again), x @ w.T, rtol=1e-4, atol=1e-4)
    with torch.inference_mode(), lk.frozen_weights() as scope:  # an inference tensor: packed each time, not kept
        wi = torch.randn(768, 256)
        assert lk.pack(wi, rows=4).packed is not lk.pack(wi, rows=4).packed and not scope._cache


@onednn
def test_frozen_weights_keep_a_slice_taken_at_each_call():
    base, x = torch.randn(1024, 512) / 512**0.5, torch.randn(64, 512)
    with torch.no_grad(), lk.frozen_weights() as scope:
        for _ in range(3):  # a new view object each call (as the logits' output-vocabulary rows are taken)
            torch.testing.assert_close(lk.linear(x, base[256:]), x @ base[256:].T, rtol=1e-4, atol=1e-4)
        assert len(_copies(scope)) == 1  # kept by the base and the view's place in it
        other = lk.linear(x, base[:512])  # another place in the same base: its own entry
        torch.testing.assert_close(other, x @ base[:512].T, rtol=1e-4, atol=1e-4)
        base[300:400].mul_(-1.0)  # through a view: the base's version counter moves, the copy is stale
        torch.testing.assert_close(lk.linear(x, base[256:]), x @ base[256:].T, rtol=1e-4, atol=1e-4)
    ref = __import__("weakref").ref(base)
    del base
    assert ref() is None and not scope._cache  # every entry went with the base


@onednn
def test_one_frozen_weights_object_entered_from_two_threads():
    import threading

    scope, x, w = lk.frozen_weights(), torch.randn(64, 512), torch.randn(512, 512) / 512**0.5
    inside, leave, errors = threading.Event(), threading.Event(), []

    def worker():
        try:
            with torch.no_grad(), scope:  # entered after the main thread entered, left after it left
                for _ in range(2):
                    torch.testing.assert_close(lk.linear(x, w), x @ w.T, rtol=1e-4, atol=1e-4)
                inside.set()
                assert leave.wait(timeout=30)
            assert lk._FROZEN.get() is None
        except Exception as e:  # noqa: BLE001 -- reported below
            errors.append(e)

    t = threading.Thread(target=worker, daemon=True)
    try:
        with scope:
            t.start()
            assert inside.wait(timeout=30)
        assert lk._FROZEN.get() is None  # the main thread's own entry was undone, not the worker's
    finally:
        leave.set()
        t.join(timeout=30)
    assert not errors and id(w) in _copies(scope)
