"""SyntheticCaptions and render: determinism, held-out split, labels vs captions, pixels."""

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from polymodal.core import random as pr
from polymodal.data.synthetic import (
    CLIP_MEAN,
    CLIP_STD,
    COLORS,
    POSITIONS,
    SHAPES,
    SIZES,
    SyntheticCaptions,
    default_heldout,
    render,
)

_WHERE_WORDS = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom", "center": "in the center"}


def _attrs(shape, color, size="large", position="center"):
    return {"shape": [shape], "color": [color], "size": [size], "position": [position]}


# --- determinism -------------------------------------------------------------------------


@given(seed=st.integers(0, 2**40), index=st.integers(0, 999))
@settings(max_examples=10, deadline=None)
def test_same_seed_and_index_same_item(seed, index):
    a = SyntheticCaptions("train", size=1000, image_size=16, seed=seed)[index]
    b = SyntheticCaptions("train", size=1000, image_size=16, seed=seed)[index]
    assert torch.equal(a["image"], b["image"])
    assert (a["caption"], a["label"], a["attributes"]) == (b["caption"], b["label"], b["attributes"])


def test_different_seeds_and_splits_differ():
    a = SyntheticCaptions("train", size=64, image_size=16, seed=0).__getitems__(range(64))
    b = SyntheticCaptions("train", size=64, image_size=16, seed=1).__getitems__(range(64))
    c = SyntheticCaptions("eval", size=64, image_size=16, seed=0).__getitems__(range(64))
    for other in (b, c):
        assert all(not torch.equal(x["image"], y["image"]) for x, y in zip(a, other))
        assert [x["caption"] for x in a] != [y["caption"] for y in other]


def test_render_same_key_same_image_different_key_differs():
    attrs = _attrs("square", "blue")
    k = pr.key(5)
    assert torch.equal(render(k, attrs, 32), render(k, attrs, 32))
    assert not torch.equal(render(k, attrs, 32), render(pr.key(6), attrs, 32))


def test_render_does_not_touch_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    render(pr.key(0), _attrs("ring", "red"), 16)
    SyntheticCaptions(size=4, image_size=16)[1]
    assert torch.equal(torch.rand(3), expected)


@given(seed=st.integers(0, 1000), image_size=st.sampled_from([16, 33, 64]))
@settings(max_examples=6, deadline=None)
def test_batch_equals_one_by_one(seed, image_size):
    ds = SyntheticCaptions("train", size=40, image_size=image_size, seed=seed)
    batch = ds.__getitems__(list(range(40)))
    for i in (0, 7, 39):
        single = ds[i]
        torch.testing.assert_close(batch[i]["image"], single["image"], rtol=0, atol=1e-6)
        assert batch[i]["caption"] == single["caption"] and batch[i]["label"] == single["label"]


def test_render_stack_of_keys_is_per_image():
    keys = pr.split(pr.key(3), 4)
    attrs = {"shape": list(SHAPES[:4]), "color": ["red", "green", "blue", "yellow"], "size": ["small"] * 4, "position": list(POSITIONS)[:4]}
    full = render(keys, attrs, 24)
    for i in range(4):
        one = render(keys[i : i + 1], {k: v[i : i + 1] for k, v in attrs.items()}, 24)
        torch.testing.assert_close(full[i : i + 1], one, rtol=0, atol=1e-6)


# --- held-out combinations --------------------------------------------------------------


def test_default_heldout_keeps_every_shape_and_colour_in_training():
    held = set(default_heldout(SHAPES, tuple(COLORS)))
    assert len(held) == len(SHAPES)
    train_pairs = {(s, c) for s in SHAPES for c in COLORS} - held
    assert {s for s, _ in train_pairs} == set(SHAPES)
    assert {c for _, c in train_pairs} == set(COLORS)


@given(seed=st.integers(0, 2**32), start=st.integers(0, 10**6))
@settings(max_examples=8, deadline=None)
def test_heldout_pairs_never_in_train_or_eval_and_only_in_heldout(seed, start):
    n = 300
    for split in ("train", "eval", "heldout"):
        ds = SyntheticCaptions(split, size=start + n, image_size=8, seed=seed)
        keys, draws = ds._draw(list(range(start, start + n)))  # attributes only, no pixels
        pairs = {ds.pairs[p] for p in draws[:, 0].tolist()}
        if split == "heldout":
            assert pairs <= ds.heldout
        else:
            assert not pairs & ds.heldout
            assert len(pairs) > len(ds.pairs) // 2  # draws cover the allowed pairs


def test_heldout_items_carry_heldout_labels():
    ds = SyntheticCaptions("heldout", size=50, image_size=8, seed=2)
    heldout_labels = {ds.label(s, c) for s, c in ds.heldout}
    items = ds.__getitems__(range(50))
    assert {it["label"] for it in items} <= heldout_labels
    assert len({it["label"] for it in items}) == len(heldout_labels)  # 50 draws over 5 pairs


def test_custom_heldout_and_vocabulary():
    ds = SyntheticCaptions("heldout", size=30, image_size=8, shapes=("circle", "square"), colors=("red", "blue"), heldout=[("square", "red")])
    assert ds.class_names() == ["red circle", "blue circle", "red square", "blue square"]
    assert {(it["attributes"]["shape"], it["attributes"]["color"]) for it in ds.__getitems__(range(30))} == {("square", "red")}
    assert all(it["label"] == 2 for it in ds.__getitems__(range(30)))


# --- items: shapes, dtypes, ranges, labels vs captions -------------------------------------


@pytest.mark.parametrize("image_size", [8, 32, 57, 224])
def test_item_shapes_dtypes_ranges(image_size):
    ds = SyntheticCaptions("eval", size=5, image_size=image_size)
    item = ds[4]
    assert set(item) == {"image", "caption", "label", "attributes"}
    assert item["image"].shape == (3, image_size, image_size) and item["image"].dtype == torch.float32
    assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert isinstance(item["caption"], str) and isinstance(item["label"], int)
    assert 0 <= item["label"] < len(ds.class_names()) == len(SHAPES) * len(COLORS)


@given(seed=st.integers(0, 2**32))
@settings(max_examples=5, deadline=None)
def test_every_pixel_in_unit_range(seed):
    n = 400  # background, ramp and noise are bounded by construction; shapes are clamped
    g = torch.Generator().manual_seed(seed)
    attrs = {a: torch.randint(0, k, (n,), generator=g) for a, k in (("shape", 5), ("color", 6), ("size", 2), ("position", 5))}
    images = render(pr.key(seed), attrs, 20)
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert images.min() < 0.2 and images.max() > 0.95  # and the range is used


def test_normalize_matches_clip_statistics():
    plain = SyntheticCaptions(size=3, image_size=16)[2]["image"]
    normed = SyntheticCaptions(size=3, image_size=16, normalize=True)[2]["image"]
    expected = (plain - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)
    torch.testing.assert_close(normed, expected)


@given(seed=st.integers(0, 10**6))
@settings(max_examples=5, deadline=None)
def test_label_matches_caption(seed):
    ds = SyntheticCaptions("train", size=200, image_size=8, seed=seed)
    names = ds.class_names()
    for it in ds.__getitems__(range(200)):
        a, cap = it["attributes"], it["caption"]
        words = re.findall(r"[a-z]+", cap)
        assert names[it["label"]] == f"{a['color']} {a['shape']}" and names[it["label"]] in cap
        assert [w for w in words if w in COLORS] == [a["color"]]
        assert [w for w in words if w in SHAPES] == [a["shape"]]
        assert [w for w in words if w in SIZES] in ([], [a["size"]])
        mentioned = [p for p, phrase in _WHERE_WORDS.items() if phrase in cap]
        assert mentioned in ([], [a["position"]])
        assert not re.search(r"\ba [aeiou]", cap)  # "an orange", never "a orange"


def test_prompts_and_class_names():
    ds = SyntheticCaptions(size=1)
    assert ds.class_names()[ds.label("triangle", "purple")] == "purple triangle"
    prompts = ds.prompts()
    assert len(prompts) == len(ds.class_names())
    assert prompts[ds.label("circle", "orange")] == "a photo of an orange circle"
    assert ds.prompts("{shape} colored {color}")[ds.label("ring", "red")] == "ring colored red"


# --- visual sanity -------------------------------------------------------------------------


@pytest.mark.parametrize("color", list(COLORS))
@pytest.mark.parametrize("shape", SHAPES)
def test_pixels_inside_shape_have_its_colour(shape, color):
    # A large shape in the centre covers a small disc around the image centre (the ring: a band)
    # whatever the jitter; the median ignores the odd background pixel and clamped noise.
    img = render(pr.key(SHAPES.index(shape) * 10 + list(COLORS).index(color)), _attrs(shape, color), 64)[0]
    yy, xx = torch.meshgrid(torch.arange(64) + 0.5, torch.arange(64) + 0.5, indexing="ij")
    r = ((xx / 64 - 0.5) ** 2 + (yy / 64 - 0.5) ** 2).sqrt()
    if shape == "ring":  # the hole: sample the band instead
        inside = (r > 0.13) & (r < 0.17)
    else:
        inside = r < 0.04 if shape == "cross" else r < 0.06
    corner = img[:, :6, :6].reshape(3, -1).mean(1)
    got = img[:, inside].median(1).values
    torch.testing.assert_close(got, torch.tensor(COLORS[color]), atol=0.06, rtol=0)
    assert (got - corner).abs().max() > 0.25  # the shape stands out from the background


@pytest.mark.parametrize("position", list(POSITIONS))
def test_shape_is_where_the_caption_says(position):
    img = render(pr.key(1), _attrs("circle", "red", "small", position), 64)[0]
    redness = (img[0] - img[1:].mean(0)).clamp(min=0)  # high on the red disc only
    ys, xs = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    w = redness / redness.sum()
    cx, cy = float((w * xs).sum()) / 64, float((w * ys).sum()) / 64
    ex, ey = POSITIONS[position]
    assert abs(cx - ex) < 0.08 and abs(cy - ey) < 0.08


def test_large_shapes_cover_more_pixels():
    areas = {}
    for size in SIZES:
        img = render(pr.key(4), _attrs("square", "blue", size), 64)[0]
        areas[size] = int(((img[2] - img[0]) > 0.4).sum())
    assert areas["large"] > 2.5 * areas["small"] > 0


# --- DataLoader, transform, errors ---------------------------------------------------------


def test_dataloader_batches_with_workers():
    ds = SyntheticCaptions("train", size=20, image_size=16, transform=lambda x: x * 2)
    batches = list(DataLoader(ds, batch_size=8, num_workers=2))
    assert [b["image"].shape[0] for b in batches] == [8, 8, 4]
    assert batches[0]["image"].shape == (8, 3, 16, 16)
    assert batches[0]["label"].dtype == torch.int64 and len(batches[0]["attributes"]["shape"]) == 8
    torch.testing.assert_close(batches[2]["image"][3], ds[19]["image"], rtol=0, atol=1e-6)
    assert batches[2]["caption"][3] == ds[19]["caption"]


def test_errors_name_expected_and_got():
    with pytest.raises(ValueError, match="split: expected one of .*got 'test'"):
        SyntheticCaptions("test")
    with pytest.raises(ValueError, match="colors: expected distinct names .*got \\('red', 'pink'\\)"):
        SyntheticCaptions(colors=("red", "pink"))
    with pytest.raises(ValueError, match="heldout: expected .*got \\[\\('circle', 'blue'\\)\\]"):
        SyntheticCaptions(colors=("red", "green"), heldout=[("circle", "blue")])
    with pytest.raises(ValueError, match="expected at least one held-out pair"):
        SyntheticCaptions("heldout", heldout=())
    with pytest.raises(ValueError, match="templates: expected templates containing"):
        SyntheticCaptions(templates=("a {shape}",))
    with pytest.raises(IndexError, match="index 5 out of range for 5 samples"):
        SyntheticCaptions(size=5)[5]
    with pytest.raises(ValueError, match="image_size: expected an int >= 8, got 4"):
        render(pr.key(0), _attrs("circle", "red"), 4)
    with pytest.raises(ValueError, match="expected equal lengths"):
        render(pr.key(0), {**_attrs("circle", "red"), "size": ["small", "large"]}, 16)
    with pytest.raises(ValueError, match="expected names from .*got \\['hexagon'\\]"):
        render(pr.key(0), _attrs("hexagon", "red"), 16)
    with pytest.raises(ValueError, match="expected \\(N, 2\\) = \\(1, 2\\) keys for 1 images, got \\(3, 2\\)"):
        render(pr.split(pr.key(0), 3), _attrs("circle", "red"), 16)


def test_negative_index_and_len():
    ds = SyntheticCaptions(size=7, image_size=8)
    assert len(ds) == 7
    assert ds[-1]["caption"] == ds[6]["caption"]
