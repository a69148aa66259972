"""S3D video encoder (polymodal.core.encoders.s3d) against torchvision's S3D, plus the generic checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models.video import s3d as tv_s3d

from checks import check_spec
from polymodal.core import random as pr
from polymodal.core.convert import expected_shapes, meta_init
from polymodal.core.encoders.s3d import S3D, S3D_BLOCKS, s3d, s3d_tiny
from polymodal.core.pytree import flatten, tree_map

ATOL = 1e-5


def _fill(template, flat, prefix=""):
    if isinstance(template, list):
        return [_fill(v, flat, f"{prefix}{i}.") for i, v in enumerate(template)]
    if isinstance(template, dict):
        return {k: _fill(v, flat, f"{prefix}{k}.") for k, v in template.items()}
    return flat[prefix[:-1]].detach().clone()


def _randomized_reference(seed: int = 0) -> nn.Module:
    """torchvision's S3D with random weights and non-trivial batch-norm statistics."""
    torch.manual_seed(seed)
    ref = tv_s3d(weights=None)
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm3d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    return ref


def _ours_from(ref: nn.Module, spec: S3D):
    sd = ref.state_dict()
    return _fill(meta_init(spec), sd), _fill(spec.init_state(), sd)


def test_layout_is_torchvision_state_dict():
    ref = tv_s3d(weights=None, num_classes=400)
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert expected_shapes(s3d(num_classes=400)) == want
    assert sum(v.numel() for v in flatten(meta_init(s3d(num_classes=400))).values()) == 8_320_048  # torchvision's meta
    head = sum(p.numel() for p in ref.classifier.parameters())
    assert sum(v.numel() for v in flatten(meta_init(s3d())).values()) == 8_320_048 - head


@pytest.mark.parametrize("training", [False, True])
def test_parity_with_torchvision(training):
    """Same outputs (and, training, the same advanced running statistics) as torchvision's S3D on an
    8-frame 32x32 clip, with the head's average pool at 1x1x1 on both sides (the clip is too small
    for torchvision's 2x7x7; the full pool is covered by the slow test)."""
    ref = _randomized_reference()
    ref.avgpool = nn.AvgPool3d(kernel_size=(1, 1, 1), stride=1)
    ref.classifier = nn.Identity()  # MUGEN's encoder: no classifier (and no dropout in training)
    spec = s3d(pool_kernel=(1, 1, 1))
    params, state = _ours_from(ref, spec)
    x = torch.rand(2, 3, 8, 32, 32, generator=torch.Generator().manual_seed(1))
    ref.train(training)
    with torch.no_grad():
        want = ref(x)
        got, new_state = spec(params, x, state, training=training)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-5)
    ref_sd = ref.state_dict()
    for k, v in flatten(new_state).items():
        torch.testing.assert_close(v, ref_sd[k], atol=1e-6, rtol=1e-5, msg=k)
    if not training:
        assert new_state is state


@pytest.mark.slow
def test_parity_full_size_with_classifier():
    """torchvision's full S3D (2x7x7 pool, 400-class head) on a 16-frame 224x224 clip."""
    ref = _randomized_reference(2).eval()
    spec = s3d(num_classes=400)
    params, state = _ours_from(ref, spec)
    x = torch.rand(1, 3, 16, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(spec(params, x, state)[0], ref(x), atol=ATOL, rtol=1e-5)


def test_state_is_not_modified_and_frozen_bn():
    spec = s3d_tiny()
    params, state = spec.init(key=pr.key(0)), spec.init_state()
    before = tree_map(lambda t: t.clone(), state)
    x = torch.rand(3, 3, 8, 32, 32)
    _, new = spec(params, x, state, training=True)
    for k, v in flatten(state).items():
        assert torch.equal(v, flatten(before)[k]), k
    assert int(flatten(new)["features.0.0.1.num_batches_tracked"]) == 1
    frozen = s3d_tiny(frozen_bn=True)
    y, same = frozen(params, x, state, training=True)
    assert same is state
    torch.testing.assert_close(y, spec(params, x, state)[0])


def test_generic_checks_tiny():
    blocks = tuple(tuple(max(1, c // 32) for c in b) for b in S3D_BLOCKS)  # 1/32 width: compiles in seconds
    spec = s3d_tiny(num_classes=5, stem=(4, 4, 8), blocks=blocks)
    params = tree_map(lambda t: pr.normal(pr.key(t.numel()), t.shape) * 0.3 if t.is_floating_point() else t,
                      spec.init(key=pr.key(0)))
    x = torch.rand(2, 3, 8, 32, 32)
    check_spec(spec, params, [x], vmap_inputs=[x.reshape(1, 2, 3, 8, 32, 32)])


def test_bad_input():
    spec = s3d_tiny()
    p = spec.init(key=pr.key(0))
    with pytest.raises(ValueError, match=r"expected video of shape \(B, 3, T, H, W\), got \(3, 8, 32, 32\)"):
        spec(p, torch.rand(3, 8, 32, 32))
    with pytest.raises(ValueError, match=r"expected video of shape \(B, 3, T, H, W\), got \(1, 1, 8, 32, 32\)"):
        spec(p, torch.rand(1, 1, 8, 32, 32))
    with pytest.raises(ValueError, match="expected at least 13 frames of 209x209"):
        s3d()(meta_init(s3d()), torch.rand(1, 3, 8, 64, 64, device="meta"))
