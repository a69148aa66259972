"""Image decoding: 16-bit greys scaled to 8 bits, transparency on white, empty images refused."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from polymodal.data.captions import ImageTextFolder, load_image
from polymodal.data.images import to_rgb
from polymodal.data.transforms import CLIPImageTransform

GREY16 = np.array([[0, 257, 1000, 32768], [40000, 65000, 65535, 12345]], dtype=np.uint16)


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def _expected8(a16: np.ndarray) -> np.ndarray:
    return np.rint(a16.astype(np.float64) * 255 / 65535).astype(np.uint8)  # hand computation: v * 255 / 65535


def test_16bit_png_is_scaled_not_clipped():
    data = _png(Image.fromarray(GREY16))
    assert Image.open(io.BytesIO(data)).mode.startswith("I")  # PIL decodes it as 16-bit grey
    rgb = np.asarray(load_image(data))
    assert rgb.shape == (2, 4, 3) and rgb.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(rgb[..., c], _expected8(GREY16))
    assert rgb.mean() < 200  # convert("RGB") gave 255 for every value above 255


def test_32bit_int_grey_is_read_as_16bit():
    im = Image.fromarray(GREY16.astype(np.int32))  # mode "I", as some decoders return 16-bit files
    assert im.mode == "I"
    np.testing.assert_array_equal(np.asarray(to_rgb(im))[..., 1], _expected8(GREY16))


def test_transparency_is_composited_on_white():
    rgba = np.array([[[0, 0, 0, 0], [255, 0, 0, 255], [255, 0, 0, 128], [10, 20, 30, 255]]], dtype=np.uint8)
    got = np.asarray(load_image(_png(Image.fromarray(rgba, "RGBA")))).astype(int)
    a = rgba[..., 3:].astype(float) / 255
    expected = rgba[..., :3] * a + 255 * (1 - a)  # "over" on white, by hand
    np.testing.assert_allclose(got, expected, atol=1)
    assert got[0, 0].tolist() == [255, 255, 255]
    la = Image.fromarray(np.array([[[0, 0], [100, 255]]], dtype=np.uint8), "LA")
    assert np.asarray(to_rgb(la))[0].tolist() == [[255, 255, 255], [100, 100, 100]]
    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.putpixel((1, 0), 1)
    pal.info["transparency"] = 0  # palette entry 0 is transparent
    assert np.asarray(load_image(_png(pal)))[0].tolist() == [[255, 255, 255], [0, 255, 0]]


def test_rgb_and_8bit_images_are_unchanged():
    rgb = Image.fromarray(np.arange(24, dtype=np.uint8).reshape(2, 4, 3))
    np.testing.assert_array_equal(np.asarray(load_image(_png(rgb))), np.asarray(rgb))
    grey = Image.fromarray(np.arange(8, dtype=np.uint8).reshape(2, 4))
    np.testing.assert_array_equal(np.asarray(load_image(_png(grey))), np.asarray(grey.convert("RGB")))


def test_transform_and_folder_use_the_same_conversion(tmp_path):
    im16 = Image.fromarray(GREY16)
    im8 = Image.fromarray(_expected8(GREY16)).convert("RGB")
    t = CLIPImageTransform(8)
    torch.testing.assert_close(t(im16), t(im8), rtol=0, atol=0)
    im16.save(tmp_path / "a.png")
    (tmp_path / "ann.jsonl").write_text('{"image": "a.png", "caption": "grey"}\n')
    image, _ = ImageTextFolder(tmp_path, "ann.jsonl")[0]
    np.testing.assert_array_equal(np.asarray(image), np.asarray(im8))


@pytest.mark.parametrize("image", [Image.new("RGB", (0, 0)), Image.new("RGB", (3, 0)),
                                   torch.zeros(3, 0, 0, dtype=torch.uint8), torch.zeros(1, 4, 0, dtype=torch.uint8)])
def test_empty_image_is_refused_by_the_transform(image):
    with pytest.raises(ValueError, match=r"CLIPImageTransform: image: expected at least 1 x 1 pixels, got (0 x \d+|\d+ x 0) \(height x width\)"):
        CLIPImageTransform(8)(image)
