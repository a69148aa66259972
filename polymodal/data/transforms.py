"""CLIP's image preprocessing on ``torchvision.transforms.v2``, and the (image, text) pair transform.

Evaluation preprocessing equals open_clip's ``image_transform(size, is_train=False)``: resize the
shortest side (bicubic, antialiased), centre crop, scale to [0, 1], normalise. Training replaces
resize + crop with ``RandomResizedCrop``, as open_clip does.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import get_worker_info
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode

from polymodal.data.tokenizer import CLIPTokenizer

try:
    from PIL import Image

    from polymodal.data.images import to_rgb
except ImportError:  # pragma: no cover - pillow comes with torchvision
    Image = None

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_INTERPOLATIONS = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}


class _RandomResizedCrop(v2.RandomResizedCrop):
    """``v2.RandomResizedCrop`` drawing from ``generator`` (the global RNG when it is ``None``).

    The draws are torchvision's, call for call, so with ``generator=None`` the crops equal
    torchvision's (and open_clip's) under the same ``torch.manual_seed``.
    """

    def __init__(self, *args, generator: torch.Generator | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.generator = generator

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        area, g, log_ratio = height * width, self.generator, self._log_ratio
        for _ in range(10):
            target_area = area * torch.empty(1).uniform_(self.scale[0], self.scale[1], generator=g).item()
            aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=g)).item()
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                i = torch.randint(0, height - h + 1, size=(1,), generator=g).item()
                j = torch.randint(0, width - w + 1, size=(1,), generator=g).item()
                return dict(top=i, left=j, height=h, width=w)
        # No valid crop in 10 tries: the central crop with the nearest allowed aspect ratio.
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            w, h = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            w, h = int(round(height * max(self.ratio))), height
        else:
            w, h = width, height
        return dict(top=(height - h) // 2, left=(width - w) // 2, height=h, width=w)


class CLIPImageTransform:
    """Image -> normalised ``(3, image_size, image_size)`` float32 tensor, as CLIP expects.

    Args:
        image_size: side of the square output.
        mean, std: per-channel normalisation (OpenAI CLIP's by default).
        is_train: ``False``: resize the shortest side to ``image_size`` and centre crop.
            ``True``: ``RandomResizedCrop(image_size, scale, ratio=(3/4, 4/3))``.
        scale: area range of the random crop (training only).
        interpolation: ``"bicubic"`` or ``"bilinear"``; resizing is antialiased.
        generator: training crops draw from it; ``None`` uses torch's global RNG, which
            ``DataLoader`` seeds differently in each worker and each epoch. A generator is copied
            into every worker process, so all workers would repeat the same crops: use it for
            single-process pipelines (a warning says so if it is used in a worker).

    Accepts a PIL image (any mode; converted to RGB first by :func:`polymodal.data.images.to_rgb`:
    16-bit greys scaled to 8 bits, transparency composited on white) or a ``uint8`` tensor ``(C, H, W)``
    with C = 1 or 3. PIL images are resized by PIL (as in open_clip), tensors by torch, whose
    antialiased bicubic kernel differs slightly from PIL's (under half a grey level on average).
    Unlike open_clip, which converts to RGB after resizing, conversion comes first, so RGBA and
    palette images are resized by colour rather than by alpha-premultiplied or palette values.

    >>> from PIL import Image
    >>> t = CLIPImageTransform(224)
    >>> t(Image.new("RGB", (640, 480))).shape
    torch.Size([3, 224, 224])
    >>> t(torch.zeros(1, 32, 48, dtype=torch.uint8)).shape
    torch.Size([3, 224, 224])
    """

    def __init__(
        self,
        image_size: int = 224,
        mean: Sequence[float] = OPENAI_CLIP_MEAN,
        std: Sequence[float] = OPENAI_CLIP_STD,
        is_train: bool = False,
        scale: tuple[float, float] = (0.9, 1.0),
        interpolation: str = "bicubic",
        generator: torch.Generator | None = None,
    ):
        if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
            raise ValueError(f"CLIPImageTransform: image_size: expected a positive int, got {image_size!r}")
        if interpolation not in _INTERPOLATIONS:
            raise ValueError(
                f"CLIPImageTransform: interpolation: expected one of {sorted(_INTERPOLATIONS)}, "
                f"got {interpolation!r}"
            )
        for name, value in (("mean", mean), ("std", std)):
            if len(value) != 3:
                raise ValueError(f"CLIPImageTransform: {name}: expected 3 values (RGB), got {tuple(value)}")
        if not (len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1):
            raise ValueError(f"CLIPImageTransform: scale: expected (lo, hi) with 0 < lo <= hi <= 1, got {scale}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(
                f"CLIPImageTransform: generator: expected torch.Generator or None, got {type(generator).__name__}"
            )
        self.image_size, self.is_train, self.interpolation = image_size, is_train, interpolation
        self.mean, self.std, self.scale = tuple(mean), tuple(std), tuple(scale)
        self.generator = generator
        mode = _INTERPOLATIONS[interpolation]
        if is_train:
            geometry = [_RandomResizedCrop(image_size, scale=self.scale, interpolation=mode, generator=generator)]
        else:
            geometry = [v2.Resize(image_size, interpolation=mode, antialias=True), v2.CenterCrop(image_size)]
        self._transform = v2.Compose([
            v2.RGB(),
            *geometry,
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(self.mean), std=list(self.std)),
            v2.ToPureTensor(),
        ])
        self._warned = False

    def __repr__(self) -> str:
        return (
            f"CLIPImageTransform(image_size={self.image_size}, mean={self.mean}, std={self.std}, "
            f"is_train={self.is_train}, scale={self.scale}, interpolation='{self.interpolation}', "
            f"generator={self.generator})"
        )

    def __call__(self, image: Any) -> torch.Tensor:
        """Args: ``image``: PIL image or uint8 tensor ``(C, H, W)``. Returns ``(3, S, S)`` float32."""
        if isinstance(image, torch.Tensor):
            if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] not in (1, 3):
                raise ValueError(
                    f"CLIPImageTransform: image: expected a uint8 tensor of shape (C, H, W) with C = 1 "
                    f"or 3, got {image.dtype} of shape {tuple(image.shape)}"
                )
        elif Image is None or not isinstance(image, Image.Image):
            raise TypeError(
                f"CLIPImageTransform: image: expected a PIL.Image.Image or a uint8 torch.Tensor "
                f"(C, H, W), got {type(image).__module__}.{type(image).__qualname__}"
            )
        else:
            image = to_rgb(image)  # 16-bit greys scaled, transparency on white (not convert("RGB"))
        height, width = (image.shape[-2], image.shape[-1]) if isinstance(image, torch.Tensor) else image.size[::-1]
        if height < 1 or width < 1:
            raise ValueError(f"CLIPImageTransform: image: expected at least 1 x 1 pixels, got {height} x {width} (height x width)")
        if self.is_train and self.generator is not None and not self._warned and get_worker_info() is not None:
            self._warned = True
            warnings.warn(
                "CLIPImageTransform: a generator used in a DataLoader worker is a copy of the same "
                "generator in every worker, so workers repeat each other's crops; pass generator=None "
                "to use the per-worker seeded global RNG",
                stacklevel=2,
            )
        return self._transform(image)


class CLIPTransform:
    """(image, text) -> (image tensor, token ids): the per-sample transform of a CLIP dataset.

    Args:
        image_transform: callable on images; default ``CLIPImageTransform()`` (evaluation).
        tokenizer: callable ``list[str] -> (N, L)`` ids; default ``CLIPTokenizer(context_length)``.
        context_length: for the default tokenizer (77 if ``None``); a given tokenizer keeps its own.

    Returns from a call: the image tensor ``(3, S, S)`` and ids ``(L,)`` for one text, or
    ``(N, L)`` for a list of N texts (e.g. COCO's captions of one image). Picklable, so it can
    be handed to ``DataLoader`` workers (e.g. as a torchvision dataset's ``transforms=``).

    >>> from PIL import Image
    >>> image, ids = CLIPTransform()(Image.new("RGB", (300, 200)), "a photo of a cat")
    >>> image.shape, ids.shape, ids[:7].tolist()
    (torch.Size([3, 224, 224]), torch.Size([77]), [49406, 320, 1125, 539, 320, 2368, 49407])
    """

    def __init__(
        self,
        image_transform: Callable[[Any], torch.Tensor] | None = None,
        tokenizer: Callable[[list[str]], torch.Tensor] | None = None,
        context_length: int | None = None,
    ):
        if tokenizer is not None and context_length is not None:
            raise ValueError(
                "CLIPTransform: expected either tokenizer or context_length, got both "
                "(a given tokenizer has its own context length)"
            )
        self.image_transform = image_transform if image_transform is not None else CLIPImageTransform()
        self.tokenizer = tokenizer if tokenizer is not None else CLIPTokenizer(context_length=context_length or 77)

    def __repr__(self) -> str:
        return f"CLIPTransform(image_transform={self.image_transform!r}, tokenizer={self.tokenizer!r})"

    def __call__(self, image: Any, text: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(text, str):
            return self.image_transform(image), self.tokenizer([text])[0]
        if isinstance(text, Sequence) and all(isinstance(t, str) for t in text):
            return self.image_transform(image), self.tokenizer(list(text))
        raise TypeError(f"CLIPTransform: text: expected str or a list of str, got {type(text).__name__}")
