"""Phrase-grounding data: built-in synthetic scenes and a JSONL format for real data.

**Synthetic scenes** (:class:`GroundingScenes`): 2 or 3 coloured shapes (``polymodal.data.synthetic``'s
shapes, colours and signed distances) on a noisy grey background, placed in distinct cells of a 3x3
grid. The caption names two of them and their relation, e.g. "a small red circle left of a blue
square"; each of the two noun phrases is a character span mapped to its object's box. The third
shape, when present, is a distractor that the caption does not name (never the same shape and colour
as a named one), so a box must be chosen from the text. Each scene also carries one GQA-style question
with its type (``obj``: "is there a red circle?", ``attr``: "what color is the circle?", ``rel``: "what
shape is left of the blue square?", ``global``: "how many shapes are there?", ``cat``: "what shape is
the red object?"). Everything is a pure function of ``(seed, split, index)``.

**JSONL** (:class:`GroundingJSONL`), one object per line::

    {"image": "images/0001.jpg",                      # relative to the JSONL file (or absolute)
     "caption": "a man in a red shirt holds a dog",
     "phrases": [{"start": 0, "end": 20, "boxes": [[12, 30, 140, 260]]},    # caption[start:end]
                 {"start": 27, "end": 32, "boxes": [[150, 120, 230, 250]]}]}

Boxes are pixel ``[x1, y1, x2, y2]`` with ``0 <= x1 < x2 <= width`` and ``0 <= y1 < y2 <= height``;
spans must lie inside the caption. A phrase with no box is allowed (it is grounded to nothing and left
out of the targets); a line with no box at all gives empty targets (every query is "no object").
Malformed lines raise ``ValueError`` naming the line, the field, what was expected and what came.

>>> ds = GroundingScenes("train", size=4, image_size=64)
>>> item = ds[0]
>>> item["image"].shape, len(item["phrases"]) == len(item["boxes"])
(torch.Size([3, 64, 64]), True)
>>> [item["caption"][s:e] for s, e in item["phrases"]][0] in item["caption"]
True
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from polymodal.core import random as pr
from polymodal.data.synthetic import COLORS, SHAPES, _noise_field, _sdf

__all__ = ["GroundingScenes", "GroundingJSONL", "WordTokenizer", "check_target", "token_map", "RELATIONS",
           "QUESTION_TYPES", "ANSWERS"]

RELATIONS = ("left of", "right of", "above", "below")
QUESTION_TYPES = ("obj", "attr", "rel", "global", "cat")  # GQA's answer types in MDETR's order (0..4)
ANSWERS: dict[str, tuple[str, ...]] = {"obj": ("no", "yes"), "attr": tuple(COLORS), "rel": SHAPES,
                                       "global": ("two", "three"), "cat": SHAPES}
_SIZES = {"small": 0.09, "large": 0.14}  # radius as a fraction of the side
_SPLITS = {"train": 0, "eval": 1}
_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")


class WordTokenizer:
    """Whole-word tokens for the synthetic vocabulary with RoBERTa's special ids (``<s>`` 0, ``<pad>`` 1,
    ``</s>`` 2): ``encode(text) -> (ids, offsets)``, offsets the ``(start, end)`` characters of each token."""

    def __init__(self, words: Sequence[str] | None = None) -> None:
        words = words if words is not None else _vocabulary()
        self.vocab = {w: i for i, w in enumerate(list(_SPECIALS) + sorted(set(words) - set(_SPECIALS)))}
        self.pad_id = 1

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        ids, offsets, pos = [0], [(0, 0)], 0
        for w in text.split(" "):
            ids.append(self.vocab.get(w, 3))
            offsets.append((pos, pos + len(w)))
            pos += len(w) + 1
        return ids + [2], offsets + [(0, 0)]


def _vocabulary() -> list[str]:
    words = {"a", "an", "is", "there", "what", "color", "shape", "the", "object", "how", "many", "shapes", "are"}
    words |= set(SHAPES) | set(COLORS) | set(_SIZES) | {w for r in RELATIONS for w in r.split()}
    words |= {w + "?" for w in SHAPES + tuple(COLORS) + ("there", "object")} | {"square?", "circle?"}
    words |= {f"{s}?" for s in SHAPES} | {"shape?", "is", "of"}
    return sorted(words)


def token_map(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> Tensor:
    """``(P, T)`` bool: token ``t`` belongs to phrase ``p`` when their character ranges overlap
    (special tokens have empty ranges and never do)."""
    out = torch.zeros(len(spans), len(offsets), dtype=torch.bool)
    for p, (s, e) in enumerate(spans):
        for t, (a, b) in enumerate(offsets):
            out[p, t] = b > a and a < e and b > s
    return out


def check_target(caption: str, spans: Sequence[tuple[int, int]], boxes: Tensor, size: tuple[int, int],
                 where: str = "target") -> None:
    """Spans inside the caption and non-empty; boxes ``(N, 4)`` pixel xyxy inside the ``(H, W)`` image
    with ``x1 < x2`` and ``y1 < y2``. Errors name the offending entry, the expectation and the value."""
    n = len(caption)
    for i, (s, e) in enumerate(spans):
        if not 0 <= s < e <= n:
            raise ValueError(f"{where}: phrase {i}: expected a span 0 <= start < end <= {n} (the caption's length), "
                             f"got ({s}, {e})")
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"{where}: boxes: expected shape (N, 4) [x1, y1, x2, y2], got {tuple(boxes.shape)}")
    h, w = size
    for i, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
        if not (x1 < x2 and y1 < y2):
            raise ValueError(f"{where}: box {i}: expected x1 < x2 and y1 < y2, got {[x1, y1, x2, y2]}")
        if x1 < 0 or y1 < 0 or x2 > w or y2 > h:
            raise ValueError(f"{where}: box {i}: expected inside the image [0, {w}] x [0, {h}], got {[x1, y1, x2, y2]}")


def _relation(a: tuple[float, float], b: tuple[float, float]) -> str:
    dx, dy = a[0] - b[0], a[1] - b[1]
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def _phrase(obj: Mapping[str, str], with_size: bool) -> str:
    return " ".join(["a"] + ([obj["size"]] if with_size else []) + [obj["color"], obj["shape"]])


class GroundingScenes(Dataset):
    """Synthetic grounding scenes (see the module docstring). Items: ``{"image": (3, S, S) float32 in [0, 1],
    "caption": str, "phrases": [(start, end)], "boxes": (N, 4) pixel xyxy float32, "box_phrase": (N,) int64
    (the phrase of each box), "objects": [{shape, color, size}], "object_boxes": (2 or 3, 4) every object's box, "question": str, "question_type": int,
    "answer": int}`` (``answer`` indexes ``ANSWERS[QUESTION_TYPES[question_type]]``)."""

    def __init__(self, split: str = "train", size: int = 1000, image_size: int = 64, seed: int = 0) -> None:
        if split not in _SPLITS:
            raise ValueError(f"GroundingScenes: split: expected one of {tuple(_SPLITS)}, got {split!r}")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 32:
            raise ValueError(f"GroundingScenes: image_size: expected an int >= 32, got {image_size!r}")
        self.split, self.size, self.image_size = split, size, image_size
        self.key = pr.fold_in(pr.key(seed), 1000 + _SPLITS[split])

    def __len__(self) -> int:
        return self.size

    def _layout(self, i: int) -> tuple[list[dict], Tensor]:
        d = pr.randint(pr.fold_in(self.key, i), (24,), 0, 1 << 20).tolist()
        n = 2 + d[0] % 2
        cells = pr.permutation(pr.fold_in(self.key, 40_000_000 + i), 9)[:n].tolist()
        objs: list[dict] = []
        for j in range(n):
            while True:  # the distractor never repeats a named (shape, colour)
                shape, color = SHAPES[d[2 + 3 * j] % len(SHAPES)], tuple(COLORS)[d[3 + 3 * j] % len(COLORS)]
                if j < 2 or all((shape, color) != (o["shape"], o["color"]) for o in objs):
                    break
                d[2 + 3 * j] += 1
            if j == 1 and (shape, color) == (objs[0]["shape"], objs[0]["color"]):
                color = tuple(COLORS)[(d[3 + 3 * j] + 1) % len(COLORS)]
            objs.append({"shape": shape, "color": color, "size": tuple(_SIZES)[d[4 + 3 * j] % 2],
                         "cell": cells[j]})
        jitter = (pr.uniform(pr.fold_in(self.key, 10_000_000 + i), (n, 3)) - 0.5)
        return objs, jitter

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.size:
            raise IndexError(f"GroundingScenes: index {i} outside [0, {self.size})")
        s = self.image_size
        objs, jitter = self._layout(i)
        k = pr.fold_in(self.key, 20_000_000 + i)
        bg = pr.uniform(k, (4,))
        img = (0.3 + 0.3 * bg[0] + 0.08 * (bg[1:4] - 0.5)).view(3, 1, 1).expand(3, s, s).clone()
        off = (pr.bits(pr.fold_in(k, 1), (2,)) % s).tolist()
        img += 0.06 * _noise_field(s)[:, off[0]:off[0] + s, off[1]:off[1] + s]
        grid = (torch.arange(s, dtype=torch.float32) + 0.5) / s
        xs, ys = grid.view(1, s), grid.view(s, 1)
        boxes, centres = [], []
        for o, jt in zip(objs, jitter):
            r = _SIZES[o["size"]]
            cx = (o["cell"] % 3 + 0.5) / 3 + 0.06 * float(jt[0])
            cy = (o["cell"] // 3 + 0.5) / 3 + 0.06 * float(jt[1])
            turn = math.pi / 6 * float(jt[2]) * 2
            u = math.cos(turn) * (xs - cx) + math.sin(turn) * (ys - cy)
            v = math.cos(turn) * (ys - cy) - math.sin(turn) * (xs - cx)
            mask = (0.5 - _sdf(SHAPES.index(o["shape"]), u, v, torch.tensor(r)) * s).clamp(0, 1)
            img = torch.lerp(img, torch.tensor(COLORS[o["color"]]).view(3, 1, 1), mask)
            on = mask > 0.5
            rows, cols = on.any(1).nonzero().flatten(), on.any(0).nonzero().flatten()
            boxes.append([float(cols[0]), float(rows[0]), float(cols[-1]) + 1, float(rows[-1]) + 1])
            centres.append((cx, cy))
        a, b = objs[0], objs[1]
        d = pr.randint(pr.fold_in(self.key, 30_000_000 + i), (4,), 0, 1 << 20).tolist()
        pa, pb = _phrase(a, d[0] % 2 == 0), _phrase(b, d[1] % 2 == 0)
        rel = _relation(centres[0], centres[1])
        caption = f"{pa} {rel} {pb}"
        spans = [(0, len(pa)), (len(caption) - len(pb), len(caption))]
        question, qtype, answer = self._question(objs, centres, d[2], d[3])
        return {"image": img.clamp(0, 1), "caption": caption, "phrases": spans,
                "boxes": torch.tensor(boxes[:2], dtype=torch.float32), "box_phrase": torch.tensor([0, 1]),
                "objects": [{k: o[k] for k in ("shape", "color", "size")} for o in objs],
                "object_boxes": torch.tensor(boxes, dtype=torch.float32),
                "question": question, "question_type": qtype, "answer": answer}

    @staticmethod
    def _question(objs: list[dict], centres: list, d0: int, d1: int) -> tuple[str, int, int]:
        qtype = d0 % len(QUESTION_TYPES)
        o = objs[d1 % len(objs)]
        name = QUESTION_TYPES[qtype]
        if name == "obj":  # half the time ask about a pair that is absent
            shape, color = o["shape"], o["color"]
            present = d1 % 2 == 0
            if not present:
                color = tuple(COLORS)[(tuple(COLORS).index(color) + 1 + d1 % 4) % len(COLORS)]
                present = any((p["shape"], p["color"]) == (shape, color) for p in objs)
            return f"is there a {color} {shape}?", qtype, int(present)
        if name == "attr":
            return f"what color is the {o['shape']}?", qtype, ANSWERS["attr"].index(o["color"])
        if name == "rel":
            a, b = objs[0], objs[1]
            return (f"what shape is {_relation(centres[0], centres[1])} the {b['color']} {b['shape']}?", qtype,
                    ANSWERS["rel"].index(a["shape"]))
        if name == "global":
            return "how many shapes are there?", qtype, len(objs) - 2
        return f"what shape is the {o['color']} object?", qtype, ANSWERS["cat"].index(o["shape"])


class GroundingJSONL(Dataset):
    """Real grounding data in the JSONL format of the module docstring; items as :class:`GroundingScenes`'
    (``image``, ``caption``, ``phrases``, ``boxes``, ``box_phrase``), images read with Pillow as float
    ``(3, H, W)`` in [0, 1], every line checked when the file is opened."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.rows = []
        with open(self.path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    self.rows.append(self._parse(json.loads(line), n))

    def _parse(self, row: dict, n: int) -> dict:
        where = f"{self.path}:{n}"
        for k, t in (("image", str), ("caption", str), ("phrases", list)):
            if not isinstance(row.get(k), t):
                raise ValueError(f"{where}: {k!r}: expected a {t.__name__}, got {type(row.get(k)).__name__}")
        spans, boxes, owner = [], [], []
        for p, ph in enumerate(row["phrases"]):
            if not isinstance(ph, dict) or not isinstance(ph.get("start"), int) or not isinstance(ph.get("end"), int):
                raise ValueError(f"{where}: phrase {p}: expected {{\"start\": int, \"end\": int, \"boxes\": "
                                 f"[[x1, y1, x2, y2], ...]}}, got {ph!r:.80}")
            spans.append((ph["start"], ph["end"]))
            for b in ph.get("boxes", []):
                if len(b) != 4:
                    raise ValueError(f"{where}: phrase {p}: expected boxes of 4 numbers [x1, y1, x2, y2], got {b}")
                boxes.append([float(v) for v in b])
                owner.append(p)
        return {"image": row["image"], "caption": row["caption"], "phrases": spans, "boxes": boxes, "owner": owner,
                "where": where}

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        from PIL import Image

        row = self.rows[i]
        p = Path(row["image"])
        p = p if p.is_absolute() else self.path.parent / p
        with Image.open(p) as im:
            img = torch.frombuffer(bytearray(im.convert("RGB").tobytes()), dtype=torch.uint8)
            img = img.view(im.height, im.width, 3).permute(2, 0, 1).float() / 255
        boxes = torch.tensor(row["boxes"], dtype=torch.float32).view(-1, 4)
        check_target(row["caption"], row["phrases"], boxes, tuple(img.shape[1:]), row["where"])
        return {"image": img, "caption": row["caption"], "phrases": row["phrases"], "boxes": boxes,
                "box_phrase": torch.tensor(row["owner"], dtype=torch.int64)}
