import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as tv1

from polymodal.data import transforms as tr
from polymodal.data.tokenizer import CLIPTokenizer
from polymodal.data.transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, CLIPImageTransform, CLIPTransform

open_clip = pytest.importorskip("open_clip")

EVAL = CLIPImageTransform(224)
REF_EVAL = open_clip.image_transform(224, is_train=False)
sizes = st.integers(1, 400)


def random_image(seed, width, height, mode="RGB"):
    channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
    arr = np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(arr[..., 0] if channels == 1 else arr, mode)


def to_tensor(image):
    arr = np.asarray(image)
    return torch.from_numpy(arr.reshape(*arr.shape[:2], -1).copy()).permute(2, 0, 1).contiguous()


@settings(max_examples=25)
@given(st.integers(0, 2**32 - 1), sizes, sizes, st.sampled_from(["RGB", "L"]), st.sampled_from([224, 32]))
def test_eval_equals_open_clip(seed, width, height, mode, size):
    image = random_image(seed, width, height, mode)
    ours = EVAL if size == 224 else CLIPImageTransform(size)
    ref = REF_EVAL if size == 224 else open_clip.image_transform(size, is_train=False)
    got = ours(image)
    assert got.shape == (3, size, size) and got.dtype == torch.float32 and type(got) is torch.Tensor
    torch.testing.assert_close(got, ref(image), rtol=0, atol=1e-5)


@settings(max_examples=10)
@given(st.integers(0, 2**32 - 1), sizes, sizes)
def test_rgba_is_converted_before_resizing(seed, width, height):
    image = random_image(seed, width, height, "RGBA")
    # composited on white first, as Hugging Face's convert_to_rgb does (not open_clip's convert("RGB"),
    # which keeps the colour under transparent pixels)
    on_white = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image).convert("RGB")
    torch.testing.assert_close(EVAL(image), REF_EVAL(on_white), rtol=0, atol=1e-5)


@settings(max_examples=10)
@given(st.integers(0, 2**32 - 1), sizes, sizes, st.sampled_from(["RGB", "L"]))
def test_uint8_tensor_input(seed, width, height, mode):
    image = random_image(seed, width, height, mode)
    x = to_tensor(image)
    # Reference: torch's antialiased bicubic on uint8 (what torchvision v2 calls on tensors),
    # shortest side to 224 as torchvision sizes it, then centre crop, scaling, normalisation.
    h, w = height, width
    out = (224, int(224 * w / h)) if h <= w else (int(224 * h / w), 224)
    resized = torch.nn.functional.interpolate(x.expand(3, -1, -1)[None], size=out, mode="bicubic", antialias=True)
    expected = tv1.Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)(tv1.CenterCrop(224)(resized[0]).float() / 255)
    got = EVAL(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # and close to the PIL path (torch's and PIL's bicubic kernels differ slightly)
    grey_levels = (got - EVAL(image)).abs() * torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1) * 255
    assert grey_levels.mean() < 0.5


@settings(max_examples=10)
@given(st.integers(0, 2**16), sizes, sizes)
def test_train_equals_open_clip_under_the_same_seed(seed, width, height):
    image = random_image(seed, width, height)
    ours, ref = CLIPImageTransform(224, is_train=True), open_clip.image_transform(224, is_train=True)
    torch.manual_seed(seed)
    got = ours(image)
    torch.manual_seed(seed)
    torch.testing.assert_close(got, ref(image), rtol=0, atol=1e-5)


def test_train_generator_is_reproducible_and_leaves_global_rng_alone():
    image = random_image(0, 320, 240)
    a = CLIPImageTransform(64, is_train=True, scale=(0.2, 1.0), generator=torch.Generator().manual_seed(5))
    b = CLIPImageTransform(64, is_train=True, scale=(0.2, 1.0), generator=torch.Generator().manual_seed(5))
    before = torch.get_rng_state()
    first = [a(image) for _ in range(3)]
    assert all(torch.equal(x, b(image)) for x in first)
    assert not torch.equal(first[0], first[1])  # the generator advances
    assert torch.equal(torch.get_rng_state(), before)


def test_train_generator_in_a_worker_warns(monkeypatch):
    monkeypatch.setattr(tr, "get_worker_info", lambda: object())
    t = CLIPImageTransform(32, is_train=True, generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="generator=None"):
        t(random_image(0, 40, 40))


def test_bad_inputs_name_what_was_expected():
    with pytest.raises(TypeError, match=r"expected a PIL.Image.Image or a uint8 torch.Tensor \(C, H, W\), "
                                        r"got numpy.ndarray"):
        EVAL(np.zeros((8, 8, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"got torch.float32 of shape \(3, 8, 8\)"):
        EVAL(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match=r"C = 1 or 3, got torch.uint8 of shape \(4, 8, 8\)"):
        EVAL(torch.zeros(4, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"interpolation: expected one of \['bicubic', 'bilinear'\], got 'nearest'"):
        CLIPImageTransform(interpolation="nearest")
    with pytest.raises(ValueError, match="image_size: expected a positive int, got 0"):
        CLIPImageTransform(0)
    with pytest.raises(ValueError, match=r"mean: expected 3 values \(RGB\), got \(0.5,\)"):
        CLIPImageTransform(mean=(0.5,))
    with pytest.raises(TypeError, match="text: expected str or a list of str, got int"):
        PAIR(random_image(0, 8, 8), 3)
    with pytest.raises(ValueError, match="either tokenizer or context_length"):
        CLIPTransform(tokenizer=CLIPTokenizer(), context_length=32)


PAIR = CLIPTransform()


def test_pair_transform():
    image = random_image(1, 300, 200)
    x, ids = PAIR(image, "A photo of a cat")
    torch.testing.assert_close(x, REF_EVAL(image), rtol=0, atol=1e-5)
    assert torch.equal(ids, open_clip.tokenize("A photo of a cat")[0])
    x, ids = CLIPTransform(context_length=16)(image, ["one", "two dogs"])
    assert torch.equal(ids, open_clip.tokenize(["one", "two dogs"], context_length=16))
    custom = CLIPTransform(CLIPImageTransform(32), CLIPTokenizer(context_length=8))
    x, ids = pickle.loads(pickle.dumps(custom))(image, "a cat")
    assert x.shape == (3, 32, 32) and ids.tolist() == [49406, 320, 2368, 49407, 0, 0, 0, 0]


class PairDataset(Dataset):
    """Deterministic (PIL image, caption) pairs of varied sizes, transformed."""

    def __init__(self, transform, n=6):
        self.transform, self.n = transform, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.transform(random_image(i, 40 + 13 * i, 90 - 7 * i), f"photo number {i} of a dog")


# spawn (the default start method on macOS and Windows, and forkserver on Linux from Python 3.14)
# pickles the dataset, transform and tokenizer into each worker.
@pytest.mark.parametrize("context", [None, pytest.param("spawn", marks=pytest.mark.slow)])
def test_dataloader_with_workers(context):
    ds = PairDataset(CLIPTransform(CLIPImageTransform(32), CLIPTokenizer(context_length=12)))
    loader = DataLoader(ds, batch_size=3, num_workers=2, multiprocessing_context=context)
    batches = list(loader)
    images = torch.cat([b[0] for b in batches])
    ids = torch.cat([b[1] for b in batches])
    assert images.shape == (6, 3, 32, 32) and ids.shape == (6, 12)
    expected = [ds[i] for i in range(6)]
    assert torch.equal(images, torch.stack([e[0] for e in expected]))
    assert torch.equal(ids, open_clip.tokenize([f"photo number {i} of a dog" for i in range(6)], context_length=12))
