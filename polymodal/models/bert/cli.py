"""``polymodal embed-text --model DIR "text" ...``: sentence embeddings printed or saved."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .pretrained import load_pretrained
from .sentence import embed_texts

__all__ = ["embed_text_command"]


def embed_text_command(args: argparse.Namespace) -> int:
    """Embed ``args.texts`` with the folder ``args.model``; save to ``args.output`` (``.pt`` / ``.npy``)
    or print one line per text (its dimension, norm and first values)."""
    if not Path(args.model).is_dir():
        raise FileNotFoundError(f"--model: no model folder at '{args.model}'")
    pre = load_pretrained(args.model)
    emb = embed_texts(pre.spec, pre.params, pre.tokenizer, args.texts, normalize=not args.no_normalize)
    if args.output:
        if args.output.endswith(".npy"):
            import numpy as np
            np.save(args.output, emb.numpy())
        else:
            torch.save(emb, args.output)
        print(f"saved {tuple(emb.shape)} embeddings to {args.output}")
        return 0
    for text, e in zip(args.texts, emb):
        head = ", ".join(f"{v:+.4f}" for v in e[:6].tolist())
        print(f"{text!r}: dim {e.numel()}, norm {float(e.norm()):.4f}, [{head}, ...]")
    return 0
