"""Zero-shot classification with a CLIP-style model (Radford et al. 2021, section 3.1).

A classifier is one text embedding per class: each class name is put into every prompt
template, the prompts are embedded and L2-normalised, averaged over templates and normalised
again (the "prompt ensemble"). An image is classified by cosine similarity to those columns.

``model`` is either a spec with ``params`` (``model.encode_text(params, tokens)``) or a module
with ``encode_image`` / ``encode_text`` methods and ``params=None`` (polymodal's shells,
open_clip's models). A model with a ``trim_text(tokens)`` method (polymodal's CLIP, spec and
shell) embeds trimmed token rows as padded ones; the classifier uses it. Nothing here depends on
a model family.

>>> import torch
>>> from polymodal.core import random as pr
>>> from polymodal.data import CLIPTokenizer
>>> from polymodal.models.clip import build
>>> clip = build("clip_tiny"); params = clip.init(key=pr.key(0))
>>> w = zero_shot_classifier(clip, params, CLIPTokenizer(context_length=32), ["cat", "dog"], ["a photo of a {}."])
>>> w.shape
torch.Size([128, 2])
>>> zero_shot_predict(clip, params, torch.randn(4, 3, 64, 64), w).predictions.shape
torch.Size([4])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.layers.linear_kernel import frozen_weights

__all__ = ["zero_shot_classifier", "zero_shot_predict", "zero_shot_accuracy", "ZeroShotPrediction", "encoders",
           "split_batch"]

Template = str | Callable[[str], str]


def encoders(model: Any, params: Any = None, state: Any = None) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
    """``(encode_image, encode_text)`` returning L2-normalised embeddings, for a spec + params or a module."""
    if params is None:
        if not (hasattr(model, "encode_image") and hasattr(model, "encode_text")):
            raise TypeError(f"expected a model with encode_image / encode_text (or a spec with params), "
                            f"got {type(model).__name__}")
        return (lambda x: F.normalize(model.encode_image(x), dim=-1)), (lambda t: F.normalize(model.encode_text(t), dim=-1))
    kw = {} if state is None else {"state": state}
    return (lambda x: model.encode_image(params, x, True, **kw)), (lambda t: model.encode_text(params, t, True))


def _device(model: Any, params: Any) -> torch.device:
    if params is not None:
        from ..core.pytree import leaves

        return leaves(params)[0].device
    p = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return p.device if p is not None else torch.device("cpu")


def _text_trimmer(model: Any) -> Callable[[Tensor], Tensor] | None:
    """The model's ``trim_text(tokens) -> tokens`` when it has one: it promises the same embeddings
    for the trimmed rows (polymodal's CLIP, spec or shell)."""
    trim = getattr(model, "trim_text", None)
    if trim is None:  # a polymodal shell: its spec's method
        from ..nn.shell import Shell

        trim = getattr(model.spec, "trim_text", None) if isinstance(model, Shell) else None
    return trim if callable(trim) else None


def _prompts(name: str, templates: Sequence[Template]) -> list[str]:
    return [t.format(name) if isinstance(t, str) else t(name) for t in templates]


@torch.no_grad()
def zero_shot_classifier(model: Any, params: Any, tokenizer: Callable[[list[str]], Tensor], classnames: Sequence[str],
                         templates: Sequence[Template], *, classes_per_batch: int = 32,
                         trim_text: bool = True) -> Tensor:
    """Class embeddings ``(E, C)`` (unit columns): the normalised mean of each class's prompt embeddings.

    Args:
        model, params: a CLIP spec and its params, or a module and ``None``.
        tokenizer: ``list[str] -> (N, T)`` token ids (e.g. ``CLIPTokenizer(context_length=...)``).
        classnames: the ``C`` class names.
        templates: format strings with ``{}`` (e.g. ``OPENAI_IMAGENET_TEMPLATES_SUBSET``) or callables.
        classes_per_batch: classes embedded per text-encoder call (bounds memory).
        trim_text: for a model with a ``trim_text`` method (polymodal's CLIP, spec or shell), drop
            the padding after each batch's longest prompt before the text tower: the same
            embeddings for a fraction of the work (prompts fill 10 to 20 of 77 positions). Other
            models always get the tokenizer's rows as they are.
    """
    if isinstance(classnames, str) or not classnames:
        raise ValueError(f"zero_shot_classifier: classnames: expected a non-empty list of names, got {classnames!r}")
    if isinstance(templates, str) or not templates:
        raise ValueError(f"zero_shot_classifier: templates: expected a non-empty list of templates, got {templates!r}")
    _, encode_text = encoders(model, params)
    device, columns, trim = _device(model, params), [], _text_trimmer(model) if trim_text else None
    scope = frozen_weights()  # the same weights for every batch: reordered for oneDNN once (CPU)
    for i in range(0, len(classnames), classes_per_batch):
        names = classnames[i:i + classes_per_batch]
        tokens = tokenizer([p for n in names for p in _prompts(n, templates)])
        if trim is not None:  # prompts fill a fraction of the context: same embeddings, a fraction of the work
            tokens = trim(tokens)
        tokens = tokens.to(device)
        with scope:
            emb = encode_text(tokens).reshape(len(names), len(templates), -1).mean(dim=1)
        columns.append(F.normalize(emb, dim=-1))
    return torch.cat(columns).T.contiguous()


class ZeroShotPrediction(NamedTuple):
    logits: Tensor  # (B, C): exp(logit_scale) * cosine similarity (100 when the model has no scale)
    predictions: Tensor  # (B,): argmax class


def _scale(model: Any, params: Any) -> float:
    """``exp(logit_scale)`` of the params, the shell or an open_clip model; 100 (CLIP's trained value) if none."""
    tree = params if params is not None else getattr(model, "params", None)
    s = tree.get("logit_scale") if isinstance(tree, dict) else getattr(model, "logit_scale", None)
    return float(s.exp()) if isinstance(s, Tensor) else 100.0


@torch.no_grad()
def zero_shot_predict(model: Any, params: Any, images: Tensor, classifier: Tensor, *, state: Any = None) -> ZeroShotPrediction:
    """Classify ``images (B, 3, S, S)`` against ``classifier (E, C)`` from :func:`zero_shot_classifier`."""
    encode_image, _ = encoders(model, params, state)
    emb = encode_image(images.to(classifier.device))
    if emb.shape[-1] != classifier.shape[0]:
        raise ValueError(f"zero_shot_predict: classifier: expected shape ({emb.shape[-1]}, C), "
                         f"got {tuple(classifier.shape)}")
    logits = _scale(model, params) * emb @ classifier
    return ZeroShotPrediction(logits, logits.argmax(dim=-1))


def split_batch(batch: Any) -> tuple[Tensor, Any]:
    """``(images, second)`` from a ``(images, x, ...)`` tuple or a dict with ``images``/``image`` and
    ``labels``/``label`` or ``tokens``."""
    if isinstance(batch, dict):
        images = batch.get("images", batch.get("image"))
        other = next((batch[k] for k in ("labels", "label", "tokens") if k in batch), None)
        if images is None or other is None:
            raise ValueError(f"expected a batch dict with 'images' and 'labels' or 'tokens', got keys {sorted(batch)}")
        return images, other
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise TypeError(f"expected a batch (images, labels-or-tokens) or a dict, got {type(batch).__name__}")


@torch.no_grad()
def zero_shot_accuracy(model: Any, params: Any, batches: Iterable[Any], classifier: Tensor, *,
                       topk: Sequence[int] = (1, 5), state: Any = None) -> dict[str, float]:
    """Top-k accuracy over ``(images, labels)`` batches streamed from a ``DataLoader``.

    Returns ``{"top1": ..., "top5": ..., "n": N}`` (k larger than the class count counts as C).
    """
    correct = {k: 0 for k in topk}
    n = 0
    num_classes = classifier.shape[1]
    scope = frozen_weights()  # the same weights for every batch: reordered for oneDNN once (CPU)
    for batch in batches:
        images, labels = split_batch(batch)
        with scope:
            logits = zero_shot_predict(model, params, images, classifier, state=state).logits
        labels = torch.as_tensor(labels, device=logits.device)
        ranked = logits.topk(min(max(topk), num_classes), dim=-1).indices
        hit = ranked == labels[:, None]
        for k in topk:
            correct[k] += int(hit[:, :k].any(-1).sum())
        n += labels.numel()
    out = {f"top{k}": (correct[k] / n if n else math.nan) for k in topk}
    out["n"] = n
    return out
