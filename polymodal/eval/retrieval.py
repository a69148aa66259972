"""Image <-> text retrieval recall@k, streamed from a DataLoader, with several captions per image.

The protocol of CLIP's COCO / Flickr30k evaluation (Radford et al. 2021, Table 13): every image
is a query against every caption (a hit if *any* of its captions ranks in the top k), and every
caption is a query against every image (a hit if its image ranks in the top k). Ties count in
the query's favour (rank = number of strictly more similar candidates).

>>> import torch
>>> img = torch.eye(3)                                   # 3 images
>>> txt = torch.tensor([[1., 0, 0], [0, 1, 0], [0, 0.6, 0.8], [0, 0.8, 0.6]])  # captions 2, 3 belong to image 2
>>> m = recall_at_k(img, txt, torch.tensor([0, 1, 2, 2]), ks=(1, 2))
>>> m["image_to_text_R@1"], m["text_to_image_R@1"]
(1.0, 0.75)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..core.layers.linear_kernel import frozen_weights
from .zero_shot import encoders, split_batch

__all__ = ["recall_at_k", "RetrievalAccumulator", "retrieval_metrics"]


def recall_at_k(image_embeddings: Tensor, text_embeddings: Tensor, text_to_image: Tensor,
                ks: Sequence[int] = (1, 5, 10), chunk: int = 1024) -> dict[str, float]:
    """Recall@k both ways from unit embeddings.

    Args:
        image_embeddings: ``(N, E)``. text_embeddings: ``(M, E)``.
        text_to_image: ``(M,)`` the image index of each caption (every image needs at least one).
        ks: the cut-offs. chunk: queries scored at a time (bounds memory to ``chunk x max(N, M)``).

    Returns:
        ``{"image_to_text_R@k": ..., "text_to_image_R@k": ..., "n_images": N, "n_texts": M}``.
    """
    n, m = image_embeddings.shape[0], text_embeddings.shape[0]
    if image_embeddings.dim() != 2 or text_embeddings.dim() != 2 or image_embeddings.shape[1] != text_embeddings.shape[1]:
        raise ValueError(f"recall_at_k: expected image_embeddings (N, E) and text_embeddings (M, E), got "
                         f"{tuple(image_embeddings.shape)} and {tuple(text_embeddings.shape)}")
    t2i = torch.as_tensor(text_to_image, device=text_embeddings.device).long()
    if t2i.shape != (m,) or (m and (t2i.min() < 0 or t2i.max() >= n)):
        raise ValueError(f"recall_at_k: text_to_image: expected shape ({m},) with values in [0, {n}), "
                         f"got shape {tuple(t2i.shape)}")
    counts = torch.bincount(t2i, minlength=n)
    if n and bool((counts == 0).any()):
        raise ValueError(f"recall_at_k: images without a caption: {torch.nonzero(counts == 0).flatten().tolist()[:10]}")
    img, txt = image_embeddings.float(), text_embeddings.float()
    t2i_rank = torch.empty(m, dtype=torch.long, device=txt.device)
    for s in range(0, m, chunk):  # caption -> images
        sim = txt[s:s + chunk] @ img.T  # (c, N)
        own = sim.gather(1, t2i[s:s + chunk, None])
        t2i_rank[s:s + chunk] = (sim > own).sum(1)
    i2t_rank = torch.empty(n, dtype=torch.long, device=img.device)
    for s in range(0, n, chunk):  # image -> captions: its best-ranked caption counts
        sim = img[s:s + chunk] @ txt.T  # (c, M)
        positive = t2i[None, :] == torch.arange(s, min(s + chunk, n), device=t2i.device)[:, None]
        best = sim.masked_fill(~positive, float("-inf")).max(1, keepdim=True).values
        i2t_rank[s:s + chunk] = (sim > best).sum(1)
    out: dict[str, float] = {}
    for k in ks:
        out[f"image_to_text_R@{k}"] = float((i2t_rank < k).float().mean()) if n else float("nan")
        out[f"text_to_image_R@{k}"] = float((t2i_rank < k).float().mean()) if m else float("nan")
    out["n_images"], out["n_texts"] = n, m
    return out


class RetrievalAccumulator:
    """Collects embeddings batch by batch; :meth:`compute` gives :func:`recall_at_k`.

    ``add(image_embeddings (B, E), text_embeddings)`` where the texts are ``(B, E)`` (one caption
    per image), ``(B, K, E)`` (K each) or a list of B ``(K_i, E)`` tensors (varying counts).

    >>> acc = RetrievalAccumulator()
    >>> acc.add(torch.eye(2), torch.eye(2)[:, None].expand(2, 3, 2))
    >>> acc.compute(ks=(1,))["text_to_image_R@1"]
    1.0
    """

    def __init__(self) -> None:
        self.images: list[Tensor] = []
        self.texts: list[Tensor] = []
        self.owners: list[Tensor] = []
        self.n_images = 0

    def add(self, image_embeddings: Tensor, text_embeddings: Tensor | Sequence[Tensor]) -> None:
        b = image_embeddings.shape[0]
        if isinstance(text_embeddings, Tensor) and text_embeddings.dim() == 2:
            text_embeddings = text_embeddings[:, None]
        if len(text_embeddings) != b:
            raise ValueError(f"RetrievalAccumulator.add: expected captions for {b} images, got {len(text_embeddings)}")
        for i, t in enumerate(text_embeddings):
            self.texts.append(t.detach())
            self.owners.append(torch.full((t.shape[0],), self.n_images + i, dtype=torch.long, device=t.device))
        self.images.append(image_embeddings.detach())
        self.n_images += b

    def compute(self, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
        if not self.images:
            raise ValueError("RetrievalAccumulator.compute: no batches were added")
        return recall_at_k(torch.cat(self.images), torch.cat(self.texts), torch.cat(self.owners), ks)


@torch.no_grad()
def retrieval_metrics(model: Any, params: Any, batches: Iterable[Any], *, ks: Sequence[int] = (1, 5, 10),
                      state: Any = None) -> dict[str, float]:
    """Recall@k over ``(images (B, 3, S, S), tokens)`` batches from a ``DataLoader`` (or dicts with
    ``images`` and ``tokens``); ``tokens`` is ``(B, T)``, ``(B, K, T)`` (K captions each, e.g.
    ``CLIPTransform`` given a list of captions) or a list of B ``(K_i, T)`` tensors.

    ``model``/``params``: a CLIP spec and its params, or a module with ``encode_image`` /
    ``encode_text`` and ``params=None``.
    """
    encode_image, encode_text = encoders(model, params, state)
    acc = RetrievalAccumulator()
    scope = frozen_weights()  # the same weights for every batch: reordered for oneDNN once (CPU)
    for batch in batches:  # the scope is entered per batch: the loader's own code runs outside it
        images, tokens = split_batch(batch)
        with scope:
            img = encode_image(images)
            if isinstance(tokens, Tensor) and tokens.dim() == 3:
                b, k, t = tokens.shape
                txt = encode_text(tokens.reshape(b * k, t).to(img.device)).reshape(b, k, -1)
            elif isinstance(tokens, Tensor):
                txt = encode_text(tokens.to(img.device))
            else:
                sizes = [len(t) for t in tokens]
                txt = list(encode_text(torch.cat(list(tokens)).to(img.device)).split(sizes))
        acc.add(img, txt)
    return acc.compute(ks)
