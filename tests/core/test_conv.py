"""Conv / ConvTranspose / SamePadConv3d / SamePadConvTranspose3d: torch.nn and TorchMultimodal parity
given the same weights, generic checks, init, errors, shells."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from checks import check_spec, copy_into
from polymodal import nn as pnn
from polymodal.core import random as pr
from polymodal.core.layers import (
    Conv, Conv1d, Conv2d, Conv3d, ConvTranspose, ConvTranspose3d, SamePadConv3d, SamePadConvTranspose3d, same_padding,
)

seeds = st.integers(0, 2**32)
REF = {1: torch.nn.Conv1d, 2: torch.nn.Conv2d, 3: torch.nn.Conv3d}
REF_T = {1: torch.nn.ConvTranspose1d, 2: torch.nn.ConvTranspose2d, 3: torch.nn.ConvTranspose3d}


def x_of(seed, *shape):
    return pr.normal(pr.key(seed), shape)


@st.composite
def conv_cfg(draw):
    dims = draw(st.sampled_from([1, 2, 3]))
    groups = draw(st.sampled_from([1, 2]))
    cin, cout = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    k = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    dil = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"]))
    pad = draw(st.sampled_from(["same", "valid", "int", "tuple"]))
    stride = (1,) * dims if pad == "same" else tuple(draw(st.integers(1, 2)) for _ in range(dims))
    padding = {"same": "same", "valid": "valid", "int": draw(st.integers(0, 1)),
               "tuple": tuple(draw(st.integers(0, 1)) for _ in range(dims))}[pad]
    size = tuple(draw(st.integers(5, 7)) for _ in range(dims))  # > every pad, >= dilated kernel (5)
    return dims, cin, cout, k, stride, padding, dil, groups, mode, size


@given(conv_cfg(), st.booleans(), st.integers(1, 2), st.booleans(), seeds)
def test_conv_matches_torch(cfg, bias, b, unbatched, seed):
    dims, cin, cout, k, stride, padding, dil, groups, mode, size = cfg
    spec = Conv(dims, cin, cout, k, stride, padding, dil, groups, bias, mode)
    p = spec.init(key=pr.key(seed))
    ref = REF[dims](cin, cout, k, stride, padding, dil, groups, bias, mode)
    copy_into(ref, p)
    x = x_of(seed + 1, *((() if unbatched else (b,)) + (cin,) + size))
    torch.testing.assert_close(spec(p, x), ref(x), rtol=1e-5, atol=1e-6)
    xb = x_of(seed + 2, b, cin, *size)
    check_spec(spec, p, [xb], compile=seed % 3 == 0, atol=1e-5)


@given(st.sampled_from([1, 2, 3]), st.sampled_from([1, 2]), st.integers(1, 3), st.integers(1, 2), st.integers(0, 1),
       st.integers(0, 1), st.integers(1, 2), st.booleans(), seeds)
def test_conv_transpose_matches_torch(dims, groups, k, s, pad, opad, dil, bias, seed):
    opad = min(opad, max(s, dil) - 1)
    cin, cout = 2 * groups, groups
    spec = ConvTranspose(dims, cin, cout, k, s, pad, opad, groups, bias, dil)
    p = spec.init(key=pr.key(seed))
    ref = REF_T[dims](cin, cout, k, s, pad, opad, groups, bias, dil)
    copy_into(ref, p)
    x = x_of(seed + 1, 2, cin, *([3] * dims))
    torch.testing.assert_close(spec(p, x), ref(x), rtol=1e-5, atol=1e-6)
    check_spec(spec, p, [x], compile=seed % 3 == 0, atol=1e-5)


def _same_pad_matches(spec, ref, cin, size, seed):
    """The spec and TorchMultimodal's module with the same weights agree; returns the output."""
    p = spec.init(key=pr.key(seed))
    copy_into(ref, p)
    x = x_of(seed + 1, 2, cin, *size)
    y = spec(p, x)
    torch.testing.assert_close(y, ref(x), rtol=1e-5, atol=1e-6)
    check_spec(spec, p, [x], compile=seed % 3 == 0, atol=1e-5)
    return y


@given(st.integers(1, 4), st.integers(1, 3), st.integers(1, 3), st.integers(1, 2), st.lists(st.integers(1, 7), min_size=3, max_size=3),
       st.booleans(), seeds)
def test_same_pad_conv3d_matches_tmm(cin, cout, k, s, size, bias, seed):
    from torchmultimodal.modules.layers.conv import SamePadConv3d as Ref

    y = _same_pad_matches(SamePadConv3d(cin, cout, k, s, bias), Ref(cin, cout, k, s, bias), cin, size, seed)
    assert y.shape[2:] == tuple(math.ceil(d / s) for d in size)  # TF "SAME": ceil(d / s)


@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 4), st.integers(1, 3), st.lists(st.integers(1, 5), min_size=3, max_size=3),
       st.booleans(), seeds)
def test_same_pad_conv_transpose3d_matches_tmm(cin, cout, k, s, size, bias, seed):
    from torchmultimodal.modules.layers.conv import SamePadConvTranspose3d as Ref

    y = _same_pad_matches(SamePadConvTranspose3d(cin, cout, k, s, bias), Ref(cin, cout, k, s, bias), cin, size, seed)
    assert y.shape[2:] == tuple(d * s for d in size)


@pytest.mark.parametrize("b,c,k,s,size", [(1, 24, 3, 1, (2, 6, 6)), (1, 8, 3, (1, 2, 2), (3, 5, 6)),
                                         (1, 6, (3, 1, 3), 2, (4, 4, 5)), (2, 4, 3, 1, (3, 4, 4)),
                                         (2, 4, (2, 3, 3), 1, (3, 4, 4)), (1, 4, 1, 1, (2, 3, 3))])
def test_same_pad_conv3d_fast_paths_equal_pad_then_conv(b, c, k, s, size):
    # batch 1, small inputs: conv3d as one conv2d over the output depths (torch's native slow_conv3d
    # would run); oneDNN inputs with symmetric padding: the conv pads. Reference: F.pad + F.conv3d.
    spec = SamePadConv3d(c, 5, k, s)
    p = spec.init(key=pr.key(0))
    x = x_of(1, b, c, *size).requires_grad_()
    pad = same_padding(spec.kernel_size, spec.stride, size)
    nnf = torch.nn.functional
    want = nnf.conv3d(nnf.pad(x, pad), p["conv"]["weight"], p["conv"]["bias"], spec.stride)
    got = spec(p, x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(want)
    torch.testing.assert_close(torch.autograd.grad(got, x, g)[0], torch.autograd.grad(want, x, g)[0],
                               rtol=1e-5, atol=1e-5)


def test_same_pad_follows_each_input_shape():
    # TorchMultimodal caches the first input's padding; ours is recomputed per shape.
    spec = SamePadConv3d(1, 1, 3, 2)
    p = spec.init(key=pr.key(0))
    assert spec(p, torch.ones(1, 1, 4, 4, 4)).shape[2:] == (2, 2, 2)
    assert spec(p, torch.ones(1, 1, 5, 5, 5)).shape[2:] == (3, 3, 3)
    assert same_padding((3, 3, 3), (1, 2, 2), (4, 8, 7)) == (1, 1, 1, 0, 1, 1)
    assert same_padding((1,), (3,), (5,)) == (0, 0)  # k < d % s: no padding


def test_hand_computed_conv1d():
    spec = Conv1d(1, 1, 3, padding=1, bias=False)
    p = {"weight": torch.tensor([[[1.0, 2.0, 3.0]]])}
    y = spec(p, torch.tensor([[[1.0, 1.0, 1.0, 1.0]]]))
    assert torch.equal(y, torch.tensor([[[5.0, 6.0, 6.0, 3.0]]]))


def test_torch_default_init_bounds():
    p = Conv2d(4, 8, 3, groups=2).init(key=pr.key(0))
    bound = 1 / math.sqrt(2 * 9)  # fan_in = in / groups * kh * kw
    assert p["weight"].shape == (8, 2, 3, 3) and p["weight"].abs().max() <= bound and p["bias"].abs().max() <= bound
    assert p["weight"].abs().max() > 0.8 * bound
    pt = ConvTranspose3d(4, 6, 2, groups=2).init(key=pr.key(0))
    assert pt["weight"].shape == (4, 3, 2, 2, 2) and pt["weight"].abs().max() <= 1 / math.sqrt(3 * 8)
    sp = SamePadConvTranspose3d(2, 3, 4).init(key=pr.key(1))
    assert sp["convt"]["weight"].shape == (2, 3, 4, 4, 4)


def test_errors():
    spec = Conv2d(3, 4, 3)
    p = spec.init(key=pr.key(0))
    with pytest.raises(ValueError, match=r"Conv2d: expected input with 3 channels \(B, 3, H, W\), got \(2, 4, 8, 8\)"):
        spec(p, torch.ones(2, 4, 8, 8))
    with pytest.raises(ValueError, match=r"expected shape \(B, C, H, W\) or \(C, H, W\), got \(8, 8\)"):
        spec(p, torch.ones(8, 8))
    with pytest.raises(ValueError, match=r"SamePadConv3d: expected input with 2 channels \(B, 2, D, H, W\)"):
        SamePadConv3d(2, 2, 3)(SamePadConv3d(2, 2, 3).init(key=pr.key(0)), torch.ones(1, 3, 4, 4, 4))
    with pytest.raises(ValueError, match="needs stride 1"):
        Conv(2, 3, 4, 3, stride=2, padding="same")
    with pytest.raises(ValueError, match="divisible by groups"):
        Conv(1, 3, 4, 3, groups=2)
    with pytest.raises(ValueError, match="a tuple of 2 ints"):
        Conv(2, 3, 4, (3, 3, 3))
    with pytest.raises(ValueError, match="padding_mode"):
        Conv(2, 3, 4, 3, padding_mode="mirror")
    with pytest.raises(ValueError, match="output_padding"):
        ConvTranspose(1, 2, 2, 3, stride=1, output_padding=1)


def test_shells():
    for cls, ref_cls in [(pnn.Conv1d, torch.nn.Conv1d), (pnn.Conv2d, torch.nn.Conv2d), (pnn.Conv3d, torch.nn.Conv3d)]:
        m, ref = cls(2, 4, 3, padding=1), ref_cls(2, 4, 3, padding=1)
        assert list(m.state_dict()) == list(ref.state_dict())
        m.load_state_dict(ref.state_dict())
        x = x_of(0, 1, 2, *([5] * m.spec.dims))
        torch.testing.assert_close(m(x), ref(x))
    assert pnn.Conv(3, 2, 4, 3).spec == Conv(3, 2, 4, 3) and Conv3d(2, 4, 3).dims == 3
    assert sorted(pnn.SamePadConv3d(2, 4, 3).state_dict()) == ["conv.bias", "conv.weight"]
    assert sorted(pnn.SamePadConvTranspose3d(2, 4, 3).state_dict()) == ["convt.bias", "convt.weight"]
    assert pnn.ConvTranspose3d(2, 4, 3).weight.shape == (2, 4, 3, 3, 3)
