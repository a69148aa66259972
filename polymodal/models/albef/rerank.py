"""Retrieval with ALBEF: contrastive scores for every pair, then ITM re-ranking of each query's top-k
candidates (Li et al. 2021, Section 4; the ALBEF repository's ``evaluation``: a re-ranked candidate
scores ``itm + sim``, the others ``-100``), and recall@k from score matrices.

>>> import torch
>>> recall_from_scores(torch.eye(3), torch.eye(3), torch.arange(3), ks=(1,))
{'image_to_text_R@1': 1.0, 'text_to_image_R@1': 1.0}
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ...core.pytree import Params

__all__ = ["encode_all", "retrieval_scores", "recall_from_scores"]


@torch.no_grad()
def encode_all(spec: Any, params: Params, images: Tensor, input_ids: Tensor, attention_mask: Tensor,
               batch_size: int = 128) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Image tokens and features ``(N, S, D_v), (N, E)``, text tokens and features ``(M, T, D), (M, E)``."""
    imgs = [spec.image_features(params, images[i:i + batch_size]) for i in range(0, images.shape[0], batch_size)]
    txts = [spec.text_features(params, input_ids[i:i + batch_size], attention_mask[i:i + batch_size])
            for i in range(0, input_ids.shape[0], batch_size)]
    return (torch.cat([h for h, _ in imgs]), torch.cat([f for _, f in imgs]),
            torch.cat([h for h, _ in txts]), torch.cat([f for _, f in txts]))


@torch.no_grad()
def retrieval_scores(spec: Any, params: Params, images: Tensor, input_ids: Tensor, attention_mask: Tensor, *,
                     k: int = 16, batch_size: int = 128) -> tuple[Tensor, Tensor, Tensor]:
    """Score matrices for ``N`` images and ``M`` texts.

    Returns:
        ``sim (N, M)`` contrastive (cosine) scores; ``i2t (N, M)`` and ``t2i (M, N)`` after ITM
        re-ranking of each query's top ``k`` by contrastive score (``itm + sim``; others ``-100``).
    """
    img_h, img_f, txt_h, txt_f = encode_all(spec, params, images, input_ids, attention_mask, batch_size)
    sim = img_f @ txt_f.T
    n, m = sim.shape
    if not 1 <= k:
        raise ValueError(f"retrieval_scores: k: expected >= 1, got {k}")

    def rerank(scores: Tensor, query_is_image: bool) -> Tensor:
        kk = min(k, scores.shape[1])
        top_s, top_i = scores.topk(kk, dim=1)
        q = torch.arange(scores.shape[0]).repeat_interleave(kk)
        c = top_i.reshape(-1)
        img_idx, txt_idx = (q, c) if query_is_image else (c, q)
        itm = torch.cat([spec.itm_scores(params, img_h[img_idx[s:s + batch_size]], txt_h[txt_idx[s:s + batch_size]],
                                         attention_mask[txt_idx[s:s + batch_size]])
                         for s in range(0, c.shape[0], batch_size)])
        out = torch.full_like(scores, -100.0)
        return out.scatter(1, top_i, itm.view(-1, kk) + top_s)

    return sim, rerank(sim, True), rerank(sim.T, False)


def recall_from_scores(i2t: Tensor, t2i: Tensor, text_to_image: Tensor, ks: Sequence[int] = (1, 5, 10)
                       ) -> dict[str, float]:
    """Recall@k both ways from score matrices ``i2t (N, M)``, ``t2i (M, N)``; ``text_to_image (M,)`` is each
    text's image. An image hits if any of its texts ranks in its top k; ties count in the query's favour
    (rank = candidates strictly better), as :func:`polymodal.eval.retrieval.recall_at_k`."""
    n, m = i2t.shape
    if t2i.shape != (m, n) or text_to_image.shape != (m,):
        raise ValueError(f"recall_from_scores: expected i2t (N, M), t2i (M, N), text_to_image (M,), got "
                         f"{tuple(i2t.shape)}, {tuple(t2i.shape)}, {tuple(text_to_image.shape)}")
    t2i_idx = text_to_image.long()
    own = t2i.gather(1, t2i_idx[:, None])
    t_rank = (t2i > own).sum(1)
    mine = t2i_idx[None, :] == torch.arange(n)[:, None]  # (N, M): the image's own texts
    best = i2t.masked_fill(~mine, float("-inf")).amax(1, keepdim=True)
    i_rank = (i2t > best).sum(1)
    out = {}
    for k in ks:
        out[f"image_to_text_R@{k}"] = float((i_rank < k).float().mean())
    for k in ks:
        out[f"text_to_image_R@{k}"] = float((t_rank < k).float().mean())
    return out
