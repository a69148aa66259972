"""Omnivore's transforms vs the reference presets (examples/omnivore/data/presets.py, composed here from
torchvision's v1 transforms), clip sampling, and the synthetic RGB-D data."""

import pytest
import torch
import torchvision.transforms as T
from torchvision.transforms.functional import InterpolationMode

from polymodal.core import random as pr
from polymodal.data.depth import COLORS, MAX_DEPTH, DepthShapes, render_rgbd
from polymodal.models.omnivore.transforms import (
    IMAGENET_MEAN, IMAGENET_STD, KINETICS_MEAN, KINETICS_STD, RGBD_MEAN, RGBD_STD, DepthNorm, depth_transform,
    image_transform, sample_clip, video_transform,
)


def ref_depth_norm(image, max_depth, clamp_max_before_scale=False, min_depth=0.01):
    """examples/omnivore/data/transforms.py: DepthNorm.forward (a minimal copy)."""
    color_img, depth_img = image[:3, ...], image[3:4, ...].clamp(min=min_depth)
    if clamp_max_before_scale:
        depth_img = depth_img.clamp(max=max_depth)
    return torch.cat([color_img, depth_img / max_depth], dim=0)


def test_image_eval_preset_equals_the_reference():
    img = torch.rand(3, 50, 70)
    ref = T.Compose([T.Resize(40, interpolation=InterpolationMode.BICUBIC, antialias=True), T.CenterCrop(32),
                     T.ConvertImageDtype(torch.float), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])(img).unsqueeze(1)
    out = image_transform(crop_size=32, resize_size=40)(img)
    assert out.shape == (3, 1, 32, 32)
    torch.testing.assert_close(out, ref)
    u8 = (img * 255).to(torch.uint8)  # uint8 in: scaled to [0, 1] first
    assert image_transform(crop_size=32, resize_size=40)(u8).shape == (3, 1, 32, 32)


def test_video_eval_preset_equals_the_reference():
    clip = torch.randint(0, 256, (6, 3, 40, 60), dtype=torch.uint8)
    ref = T.Compose([T.ConvertImageDtype(torch.float32), T.Resize(36, antialias=True),
                     T.Normalize(KINETICS_MEAN, KINETICS_STD), T.CenterCrop(32)])(clip).permute(1, 0, 2, 3)
    torch.testing.assert_close(video_transform(crop_size=32, resize_size=36)(clip), ref)
    torch.manual_seed(0)
    assert video_transform(train=True, crop_size=32, resize_size=36)(clip).shape == (3, 6, 32, 32)


def test_depth_eval_preset_equals_the_reference():
    rgbd = torch.cat([torch.rand(3, 48, 64), 100 * torch.rand(1, 48, 64) - 5], 0)  # depths beyond both clamps
    ref = T.Compose([T.Resize(40, interpolation=InterpolationMode.BILINEAR, antialias=True), T.CenterCrop(32),
                     T.Normalize(RGBD_MEAN, RGBD_STD)])(ref_depth_norm(rgbd.clone(), 75.0, True)).unsqueeze(1)
    out = depth_transform(crop_size=32, resize_size=40)(rgbd)
    assert out.shape == (4, 1, 32, 32)
    torch.testing.assert_close(out, ref)
    for clamp in (False, True):
        torch.testing.assert_close(DepthNorm(10.0, clamp)(rgbd), ref_depth_norm(rgbd.clone(), 10.0, clamp))


def test_bad_input_names_the_expected_layout():
    with pytest.raises(ValueError, match=r"DepthNorm: expected an RGB-D image \(4, H, W\).* got \(3, 8, 8\)"):
        DepthNorm(10.0)(torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match=r"video_transform: expected a clip of shape \(T, 3, H, W\).* got \(3, 8, 8\)"):
        video_transform(crop_size=8, resize_size=8)(torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match="max_depth: expected > 0"):
        DepthNorm(0.0)


def test_sample_clip():
    assert sample_clip(10, 4, 2).tolist() == [1, 3, 5, 7]  # centred: 7 frames spanned, 3 to spare
    assert sample_clip(3, 4).tolist() == [0, 1, 2, 2]  # too short: the last frame repeats
    starts = {int(sample_clip(20, 4, 2, key=pr.key(i))[0]) for i in range(200)}
    assert starts == set(range(14))  # every start from 0 to 20 - 7
    assert torch.equal(sample_clip(20, 4, 2, key=pr.key(3)), sample_clip(20, 4, 2, key=pr.key(3)))
    with pytest.raises(ValueError, match="expected num_frames, frames_per_clip, step >= 1"):
        sample_clip(0, 4)


def test_depth_shapes_label_is_the_nearer_colour():
    ds = DepthShapes("train", 40, image_size=32, seed=1)
    items = ds.__getitems__(range(40))
    assert {it["label"] for it in items} and all(0 <= it["label"] < len(COLORS) for it in items)
    for it in items:
        rgb, depth = it["rgbd"][:3], it["rgbd"][3]
        assert it["rgbd"].shape == (4, 32, 32) and 0 < float(depth.min()) and float(depth.max()) <= MAX_DEPTH
        means = {}
        for name in (it["near"], it["far"]):  # depth under the pixels of each colour
            close = (rgb - torch.tensor(COLORS[name]).view(3, 1, 1)).abs().amax(0) < 0.12
            assert int(close.sum()) > 5, name
            means[name] = float(depth[close].mean())
        assert means[it["near"]] < means[it["far"]] < MAX_DEPTH * 0.98
        assert list(COLORS)[it["label"]] == it["near"] and it["near"] != it["far"]
    again = DepthShapes("train", 40, image_size=32, seed=1)[7]
    assert torch.equal(again["rgbd"], items[7]["rgbd"])


def test_depth_order_is_invisible_in_rgb():
    """Swapping which shape is nearer changes the depth map only."""
    attrs = {"shape": torch.tensor([[0, 3]]), "color": torch.tensor([[0, 2]])}
    a = render_rgbd(pr.key(5), attrs | {"near_first": torch.tensor([True])}, 32)
    b = render_rgbd(pr.key(5), attrs | {"near_first": torch.tensor([False])}, 32)
    assert torch.equal(a[:, :3], b[:, :3]) and not torch.equal(a[:, 3], b[:, 3])
