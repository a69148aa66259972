"""FLAVA's data transforms, every random draw from an explicit key (``polymodal.core.random``).

* :class:`FLAVAImageTransform`: a (random-resized-crop or plain) resize to the encoder's size (bicubic,
  CLIP-normalised) and the same crop at the dVAE's size (``map_pixels``), plus a BEiT block mask;
* :func:`block_mask`: BEiT's masking generator (Bao et al. 2022, Algorithm 1; TorchMultimodal's
  ``ImageMaskingGenerator``: rectangles of 16+ patches, aspect 0.3-3.3, 75 of 196 patches);
* :func:`mlm_mask`: BERT's masking (15% of the real tokens; of those 80% ``[MASK]``, 10% random, 10% kept);
* :func:`itm_negatives`: which captions to swap for another example's, for image-text matching.

>>> from polymodal.core import random as pr
>>> m = block_mask(pr.key(0), (14, 14), 75)
>>> m.shape, 16 <= int(m.sum()) <= 75
(torch.Size([14, 14]), True)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor
from torchvision.transforms import InterpolationMode

from ...core import random as pr

__all__ = ["FLAVAImageTransform", "block_mask", "block_masks", "mlm_mask", "itm_negatives", "map_pixels",
           "IMAGE_MEAN", "IMAGE_STD"]

IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
LOGIT_LAPLACE_EPS = 0.1


def map_pixels(x: Tensor) -> Tensor:
    """DALL-E's input range: ``[0, 1] -> [0.1, 0.9]``."""
    if not x.is_floating_point():
        raise ValueError(f"map_pixels: expected a floating image, got {x.dtype}")
    return (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS


def _uniforms(key: Tensor, n: int) -> list[float]:
    return pr.uniform(key, (n,), dtype=torch.float64).tolist()


def block_mask(key: Tensor, grid: int | tuple[int, int] = 14, num_masking_patches: int = 75,
               min_num_patches: int = 16, max_num_patches: int | None = None, min_aspect: float = 0.3,
               max_aspect: float | None = None) -> Tensor:
    """BEiT block masking: ``(h, w)`` bool, True = masked, drawn from ``key`` (same key, same mask).

    Rectangles of area ``U(min_num_patches, remaining)`` and log-uniform aspect ratio are added (10 tries
    each) until ``num_masking_patches`` are masked or a round adds none: the reference's algorithm and
    statistics, with its ``random`` module replaced by draws from the key.
    """
    return block_masks(key[None], grid, num_masking_patches, min_num_patches, max_num_patches, min_aspect,
                       max_aspect)[0]


def _table(key: Tensor, j: int) -> Tensor:
    return pr.uniform(pr.fold_in(key, j), (64, 4), dtype=torch.float64)


def block_masks(keys: Tensor, grid: int | tuple[int, int] = 14, num_masking_patches: int = 75,
                min_num_patches: int = 16, max_num_patches: int | None = None, min_aspect: float = 0.3,
                max_aspect: float | None = None) -> Tensor:
    """:func:`block_mask` for each of ``keys (n, 2)``: ``(n, h, w)``, row ``i`` equal to ``block_mask(keys[i])``
    (the first 64 attempts' draws of every key are made in one call: a batch of masks at a fraction of the cost)."""
    h_grid, w_grid = (grid, grid) if isinstance(grid, int) else grid
    max_num = num_masking_patches if max_num_patches is None else max_num_patches
    lo, hi = math.log(min_aspect), math.log(max_aspect or 1 / min_aspect)
    first = torch.func.vmap(_table, in_dims=(0, None))(keys, 0).tolist() if len(keys) else []
    out = []
    for key, table in zip(keys, first):
        mask = [[False] * w_grid for _ in range(h_grid)]
        count, draw = 0, 0
        while count < num_masking_patches:
            budget = min(num_masking_patches - count, max_num)
            delta = 0
            for _ in range(10):
                if draw % 64 == 0 and draw:  # 64 attempts' draws at a time (one key each)
                    table = _table(key, draw // 64).tolist()
                u = table[draw % 64]
                draw += 1
                area = min_num_patches + (budget - min_num_patches) * u[0]
                aspect = math.exp(lo + (hi - lo) * u[1])
                h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
                if w < w_grid and h < h_grid:
                    top = min(int(u[2] * (h_grid - h + 1)), h_grid - h)
                    left = min(int(u[3] * (w_grid - w + 1)), w_grid - w)
                    new = h * w - sum(sum(row[left:left + w]) for row in mask[top:top + h])
                    if 0 < new <= budget:
                        for row in mask[top:top + h]:
                            row[left:left + w] = [True] * w
                        delta = new
                    if delta > 0:
                        break
            if delta == 0:
                break
            count += delta
        out.append(mask)
    return torch.tensor(out, dtype=torch.bool).reshape(len(keys), h_grid, w_grid)


def mlm_mask(key: Tensor, input_ids: Tensor, *, mask_id: int, vocab_size: int, special_ids: Sequence[int],
             prob: float = 0.15, ignore_index: int = -1) -> tuple[Tensor, Tensor]:
    """BERT's masking of ``input_ids (B, T)``: ``(masked_ids, labels)``; each non-special token is chosen with
    probability ``prob``; chosen tokens become ``mask_id`` (80%), a random id (10%) or stay (10%); ``labels``
    hold the original id at chosen positions and ``ignore_index`` elsewhere."""
    k_sel, k_how, k_rand = pr.split(key, 3)
    special = torch.zeros_like(input_ids, dtype=torch.bool)
    for s in special_ids:
        special |= input_ids == s
    chosen = (pr.uniform(k_sel, tuple(input_ids.shape)) < prob) & ~special
    how = pr.uniform(k_how, tuple(input_ids.shape))
    random_ids = pr.randint(k_rand, tuple(input_ids.shape), 0, vocab_size).to(input_ids.dtype)
    masked = torch.where(chosen & (how < 0.8), torch.full_like(input_ids, mask_id), input_ids)
    masked = torch.where(chosen & (how >= 0.8) & (how < 0.9), random_ids, masked)
    return masked, torch.where(chosen, input_ids, torch.full_like(input_ids, ignore_index))


def itm_negatives(key: Tensor, n: int, prob: float = 0.5, groups: Sequence[int] | None = None
                  ) -> tuple[Tensor, Tensor]:
    """``(text_index (n,), itm_labels (n,))``: row ``i`` keeps its own caption (label 1) or, with probability
    ``prob``, takes another row's (label 0). With ``groups`` (e.g. class labels), a negative comes from a row of
    another group (rows whose group has no other group to draw from stay positive)."""
    k_neg, k_pick = pr.split(key, 2)
    neg = (pr.uniform(k_neg, (n,)) < prob).tolist()
    order = pr.permutation(k_pick, n).tolist()
    index, labels = list(range(n)), [1] * n
    for i in range(n):
        if not neg[i]:
            continue
        for j in order[i:] + order[:i]:
            if j != i and (groups is None or groups[j] != groups[i]):
                index[i], labels[i] = j, 0
                break
    return torch.tensor(index), torch.tensor(labels)


class FLAVAImageTransform:
    """An image ``(3, H, W)`` float in ``[0, 1]`` (or a PIL image) -> ``{"image" (3, S, S) normalised,
    "image_for_codebook" (3, S_c, S_c) in [0.1, 0.9], "image_patches_mask" (g, g) bool}`` from ``key``.

    Training draws a random resized crop (scale 0.9-1); evaluation resizes. The encoder's image is bicubic
    (antialiased); the codebook's is the same crop resampled with Lanczos for PIL input (the reference's) and
    bicubic for tensors (torchvision has no tensor Lanczos).

    >>> from polymodal.core import random as pr
    >>> t = FLAVAImageTransform(encoder_input_size=32, codebook_input_size=32, mask_window_size=4,
    ...                         mask_num_patches=6, mask_min_patches=2)
    >>> out = t(torch.rand(3, 40, 40), key=pr.key(0))
    >>> out["image"].shape, out["image_for_codebook"].shape, out["image_patches_mask"].shape
    (torch.Size([3, 32, 32]), torch.Size([3, 32, 32]), torch.Size([4, 4]))
    """

    def __init__(self, is_train: bool = True, encoder_input_size: int = 224, codebook_input_size: int = 112,
                 scale: tuple[float, float] = (0.9, 1.0), image_mean: Sequence[float] = IMAGE_MEAN,
                 image_std: Sequence[float] = IMAGE_STD, mask_window_size: int = 14, mask_num_patches: int = 75,
                 mask_max_patches: int | None = None, mask_min_patches: int = 16) -> None:
        self.is_train, self.size, self.codebook_size, self.scale = is_train, encoder_input_size, codebook_input_size, scale
        self.mean, self.std = list(image_mean), list(image_std)
        self.mask_args = (mask_window_size, mask_num_patches, mask_min_patches, mask_max_patches)

    def _crop(self, key: Tensor, h: int, w: int) -> tuple[int, int, int, int]:
        """torchvision's RandomResizedCrop.get_params (ratio 3/4-4/3), its draws from ``key``."""
        area, lr = h * w, (math.log(3 / 4), math.log(4 / 3))
        for t in range(10):
            u = _uniforms(pr.fold_in(key, t), 4)
            target = area * (self.scale[0] + (self.scale[1] - self.scale[0]) * u[0])
            ratio = math.exp(lr[0] + (lr[1] - lr[0]) * u[1])
            cw, ch = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
            if 0 < cw <= w and 0 < ch <= h:
                return int(u[2] * (h - ch + 1)), int(u[3] * (w - cw + 1)), ch, cw
        return 0, 0, h, w

    def __call__(self, image, *, key: Tensor) -> dict[str, Tensor]:
        k_crop, k_mask = pr.split(key, 2)
        if isinstance(image, Tensor):
            if image.dim() != 3 or image.shape[0] != 3 or not image.is_floating_point():
                raise ValueError(f"FLAVAImageTransform: expected a float image (3, H, W), got {image.dtype} "
                                 f"{tuple(image.shape)}")
            h, w = image.shape[-2:]
            second = InterpolationMode.BICUBIC
        else:
            image = TF.to_image(image.convert("RGB"))
            h, w = image.shape[-2:]
            second = InterpolationMode.LANCZOS
        top, left, ch, cw = self._crop(k_crop, h, w) if self.is_train else (0, 0, h, w)
        crop = TF.crop(image, top, left, ch, cw)
        if not isinstance(crop, Tensor) or not crop.is_floating_point():
            pil = TF.to_pil_image(crop)
            enc = TF.to_dtype(TF.to_image(TF.resize(pil, [self.size] * 2, InterpolationMode.BICUBIC)), scale=True)
            cb = TF.to_dtype(TF.to_image(TF.resize(pil, [self.codebook_size] * 2, second)), scale=True)
        else:
            enc = TF.resize(crop, [self.size] * 2, InterpolationMode.BICUBIC, antialias=True).clamp(0, 1)
            cb = TF.resize(crop, [self.codebook_size] * 2, InterpolationMode.BICUBIC, antialias=True).clamp(0, 1)
        g, n, lo, hi = self.mask_args
        return {"image": TF.normalize(torch.as_tensor(enc).float(), self.mean, self.std),
                "image_for_codebook": map_pixels(torch.as_tensor(cb).float()),
                "image_patches_mask": block_mask(k_mask, g, n, lo, hi)}
