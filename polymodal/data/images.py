"""Any decoded PIL image to 8-bit RGB, without the surprises of ``Image.convert("RGB")``.

``convert("RGB")`` clips 16-bit and 32-bit integer greys (``"I;16"``, ``"I"``: a 16-bit PNG)
to 255, so such images load almost all white; and it drops the alpha channel, so a transparent
pixel shows whatever colour it happens to store (often black). :func:`to_rgb` instead

* scales high-bit-depth greys to 8 bits: ``round(v * 255 / 65535)`` for ``"I;16*"`` and ``"I"``
  (``"I"`` is read as 16-bit, values clipped to ``[0, 65535]``: that is what a 16-bit PNG or
  TIFF decodes to), and ``"F"`` as ``[0, 1]`` floats;
* composites images with transparency (``RGBA``, ``LA``, ``PA``, palette or greys with a
  ``transparency`` entry) on a white background, as Hugging Face's ``convert_to_rgb`` does;
* converts everything else with ``convert("RGB")`` (8-bit greys, palettes, CMYK, YCbCr, ...).

>>> import numpy as np
>>> from PIL import Image
>>> grey16 = Image.fromarray(np.array([[0, 257, 32768, 65535]], dtype=np.uint16))
>>> grey16.mode, np.asarray(to_rgb(grey16))[0, :, 0].tolist()
('I;16', [0, 1, 128, 255])
>>> to_rgb(Image.new("RGBA", (1, 1), (0, 0, 0, 0))).getpixel((0, 0))  # fully transparent -> white
(255, 255, 255)
"""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["to_rgb"]

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def _grey_to_8bit(im: Image.Image) -> Image.Image:
    a = np.asarray(im)
    if im.mode == "F":
        a = np.clip(np.nan_to_num(a.astype(np.float64)), 0.0, 1.0) * 255.0
    else:  # "I;16", "I;16B", "I;16L", "I;16N", "I"
        a = np.clip(a.astype(np.float64), 0, 65535) * (255.0 / 65535.0)
    return Image.fromarray(np.rint(a).astype(np.uint8))  # 2-D uint8: mode "L"


def to_rgb(im: Image.Image) -> Image.Image:
    """``im`` as an 8-bit ``"RGB"`` image (see the module docstring); an RGB image is returned as is."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        im = _grey_to_8bit(im)
    if im.mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")
