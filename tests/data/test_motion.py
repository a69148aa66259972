"""MovingShapes and render_video: determinism, shapes, labels, and the motion itself."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from polymodal.core import random as pr
from polymodal.data.motion import COLORS, DIRECTIONS, SHAPES, MovingShapes, render_video

# Expected centroid motion (x, y) per direction label; y grows downwards (row index).
_SIGN = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


@given(seed=st.integers(0, 2**40), index=st.integers(0, 99))
@settings(max_examples=8, deadline=None)
def test_same_seed_split_index_same_item(seed, index):
    a = MovingShapes("train", 100, frames=4, image_size=16, seed=seed)[index]
    b = MovingShapes("train", 100, frames=4, image_size=16, seed=seed)[index]
    assert torch.equal(a["video"], b["video"])
    assert {k: v for k, v in a.items() if k != "video"} == {k: v for k, v in b.items() if k != "video"}


def test_batched_equals_one_by_one_and_splits_differ():
    ds = MovingShapes("train", 16, frames=4, image_size=16)
    batch = ds.__getitems__(range(16))
    for i in (0, 7, 15):
        assert torch.equal(batch[i]["video"], ds[i]["video"])
    other = MovingShapes("eval", 16, frames=4, image_size=16).__getitems__(range(16))
    assert all(not torch.equal(x["video"], y["video"]) for x, y in zip(batch, other))


def test_item_fields_and_shapes():
    ds = MovingShapes("eval", 64, frames=6, image_size=24, seed=3)
    items = ds.__getitems__(range(64))
    for it in items:
        assert it["video"].shape == (3, 6, 24, 24) and it["video"].dtype == torch.float32
        assert 0 <= float(it["video"].min()) and float(it["video"].max()) <= 1
        assert DIRECTIONS[it["label"]] == it["direction"]
        assert it["shape"] in SHAPES and it["color"] in COLORS
        assert it["caption"].split() in (["a", it["color"], it["shape"], "moves", it["direction"]],
                                         ["an", it["color"], it["shape"], "moves", it["direction"]])
    assert {it["direction"] for it in items} == set(DIRECTIONS)  # all labels occur
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=5)))
    assert batch["video"].shape == (5, 3, 6, 24, 24) and batch["label"].dtype == torch.int64


def _centroid(frame, rgb):
    """Centroid (x, y) in pixels of the pixels close to the shape colour ``rgb``; frame (3, H, W)."""
    close = ((frame - torch.tensor(rgb).view(3, 1, 1)).abs().amax(0) < 0.2).float()
    ys, xs = torch.meshgrid(torch.arange(frame.shape[1]).float(), torch.arange(frame.shape[2]).float(), indexing="ij")
    return float((close * xs).sum() / close.sum()), float((close * ys).sum() / close.sum())


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_centroid_moves_in_the_labelled_direction(direction):
    s, t = 48, 6
    attrs = {"shape": ["circle", "square", "cross"], "color": ["red", "blue", "yellow"], "direction": [direction] * 3}
    videos = render_video(pr.key(11), attrs, frames=t, image_size=s)
    assert videos.shape == (3, 3, t, s, s)
    sx, sy = _SIGN[direction]
    for video, color in zip(videos, attrs["color"]):
        xy = torch.tensor([_centroid(video[:, f], COLORS[color]) for f in range(t)])  # (T, 2)
        step = xy[1:] - xy[:-1]
        along = step[:, 0] * sx + step[:, 1] * sy  # motion along the labelled direction
        across = step[:, 0] * abs(sy) + step[:, 1] * abs(sx)
        assert bool((along > 1.0).all()), (direction, xy)  # more than a pixel per frame, every frame
        assert float(across.abs().max()) < 0.5, (direction, xy)
        assert float(along.sum()) > 0.3 * s


def test_single_video_and_key_dependence():
    attrs = {"shape": "ring", "color": "green", "direction": "up"}
    a = render_video(pr.key(1), attrs, 4, 16)
    assert a.shape == (3, 4, 16, 16)
    assert torch.equal(a, render_video(pr.key(1), attrs, 4, 16))
    assert not torch.equal(a, render_video(pr.key(2), attrs, 4, 16))
    assert not torch.equal(a[:, 0], a[:, 1])  # frames differ


def test_bad_input():
    with pytest.raises(ValueError, match="expected names from"):
        render_video(pr.key(0), {"shape": "blob", "color": "red", "direction": "left"})
    with pytest.raises(ValueError, match="expected keys"):
        render_video(pr.key(0), {"shape": "circle", "color": "red"})
    with pytest.raises(ValueError, match="frames: expected an int >= 2"):
        render_video(pr.key(0), {"shape": "circle", "color": "red", "direction": "left"}, frames=1)
    with pytest.raises(ValueError, match="split: expected one of"):
        MovingShapes("validation", 4)
    with pytest.raises(IndexError):
        MovingShapes("train", 4)[4]


def test_dark_background_keeps_the_motion_and_puts_the_shape_above_it():
    attrs = {"shape": ["circle", "square"], "color": ["blue", "red"], "direction": ["right", "up"]}
    dark = render_video(pr.key(4), attrs, frames=4, image_size=32, background="dark")
    grey = render_video(pr.key(4), attrs, frames=4, image_size=32)
    assert float(dark[:, :, :, :2, :2].max()) < 0.2 < float(grey[:, :, :, :2, :2].min())  # corners: background
    for video, color in zip(dark, attrs["color"]):
        shape = (video - torch.tensor(COLORS[color]).view(3, 1, 1, 1)).abs().amax(0) < 0.2  # (T, H, W)
        assert bool((video.amax(0)[shape] > 0.5).all())  # the shape's brightest channel is well above the background
    ds = MovingShapes("train", 4, frames=4, image_size=16, background="dark")
    assert ds[0]["video"].shape == (3, 4, 16, 16) and ds.background == "dark"
    with pytest.raises(ValueError, match=r"background: expected one of \('grey', 'dark'\), got 'white'"):
        MovingShapes("train", 4, background="white")
