"""Rank sentences by similarity to a query with a local sentence-transformers / BERT folder.

    huggingface-cli download sentence-transformers/all-MiniLM-L6-v2 --local-dir minilm
    python examples/sentence_similarity.py --model minilm "A man is eating food."

Embeddings are the mean of the last hidden states over real tokens, L2-normalised (the
sentence-transformers recipe), so the dot product is the cosine similarity. ``transformers`` is
not needed. ``--random-demo`` writes a randomly initialised tiny BERT folder first, to show the
mechanics offline (its ranking means nothing).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from polymodal.core import random as pr
from polymodal.models.bert import bert_text_encoder, embed_texts, load_pretrained, to_huggingface

CORPUS = [
    "A man is eating a piece of bread.",
    "A man is riding a horse.",
    "A woman is playing the violin.",
    "Two men pushed carts through the woods.",
    "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.",
    "The new movie is awesome.",
]


def random_folder(directory: Path) -> Path:
    """A tiny random BERT saved as a Hugging Face folder (config.json, model.safetensors, vocab.txt)."""
    from safetensors.torch import save_file

    words = sorted({w.strip(".,").lower() for s in CORPUS for w in s.split()} | {"food", "eating"})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    spec = bert_text_encoder(vocab_size=len(vocab), hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                             max_position_embeddings=64)
    sd = to_huggingface(spec.init(key=pr.key(0)), spec)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(directory / "model.safetensors"))
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (directory / "config.json").write_text(json.dumps({
        "model_type": "bert", "vocab_size": len(vocab), "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 64}))
    return directory


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("query", nargs="?", default="A man is eating food.")
    ap.add_argument("--model", help="Hugging Face model folder (e.g. all-MiniLM-L6-v2)")
    ap.add_argument("--random-demo", action="store_true", help="use a random tiny BERT (offline, meaningless ranks)")
    args = ap.parse_args()
    if not args.model and not args.random_demo:
        ap.error("give --model DIR (see the docstring for a download command) or --random-demo")
    folder = Path(args.model) if args.model else random_folder(Path(tempfile.mkdtemp()))
    pre = load_pretrained(folder)
    emb = embed_texts(pre.spec, pre.params, pre.tokenizer, [args.query] + CORPUS)
    scores = emb[1:] @ emb[0]
    print(f"query: {args.query}")
    for i in scores.argsort(descending=True).tolist():
        print(f"  {scores[i]:+.4f}  {CORPUS[i]}")


if __name__ == "__main__":
    main()
