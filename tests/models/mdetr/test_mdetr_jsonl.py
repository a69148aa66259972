"""The JSONL path of ``polymodal train mdetr`` end to end: images and a grounding JSONL file written to
disk, a tiny byte-level BPE tokenizer trained with the ``tokenizers`` library and saved in RoBERTa's
layout (``vocab.json`` + ``merges.txt``; ``<s>`` 0, ``<pad>`` 1, ``</s>`` 2), two training steps through
the CLI and the one loop, evaluation at the end of training and with ``polymodal eval --run``."""

import json

import pytest
import torch
from PIL import Image, ImageDraw
from tokenizers import ByteLevelBPETokenizer

from polymodal.cli import main
from polymodal.models.mdetr.task import Collate, _roberta_tokenizer
from polymodal.train import LoopConfig, make_task

COLORS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 180, 60)}
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


def _write_data(root, n=10):
    """``n`` scenes of two shapes (sizes vary, so images get padded) and their JSONL lines; the captions."""
    (root / "images").mkdir()
    lines, captions = [], []
    for i in range(n):
        w, h = 72 + 8 * (i % 3), 64 + 8 * (i % 2)
        c1, c2 = list(COLORS)[i % 3], list(COLORS)[(i + 1) % 3]
        b1, b2 = [4 + i % 5, 6, 30 + i % 5, 34], [40, 20 + i % 4, 68, 50 + i % 4]
        im = Image.new("RGB", (w, h), (128, 128, 128))
        d = ImageDraw.Draw(im)
        d.rectangle(b1, fill=COLORS[c1])
        d.ellipse(b2, fill=COLORS[c2])
        im.save(root / "images" / f"{i:02d}.png")
        cap = f"a {c1} square left of a {c2} circle"
        second = cap.rindex("a ")
        phrases = [{"start": 0, "end": len(f"a {c1} square"), "boxes": [b1]},
                   {"start": second, "end": len(cap), "boxes": [b2]}]
        lines.append({"image": f"images/{i:02d}.png", "caption": cap, "phrases": phrases})
        captions.append(cap)
    # a line whose phrase has no box (allowed: grounded to nothing, no target)
    lines[-1]["phrases"].append({"start": 2, "end": 2 + len(list(COLORS)[(n - 1) % 3]), "boxes": []})
    (root / "data.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return captions


@pytest.fixture
def jsonl(tmp_path):
    captions = _write_data(tmp_path)
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(captions, vocab_size=300, min_frequency=1, special_tokens=SPECIALS)
    (tmp_path / "tok").mkdir()
    tok.save_model(str(tmp_path / "tok"))  # vocab.json + merges.txt
    return tmp_path


def test_collated_jsonl_batch_maps_phrases_to_tokens_and_boxes(jsonl):
    task = make_task("mdetr", "tiny", {"data": str(jsonl / "data.jsonl"), "tokenizer": str(jsonl / "tok")},
                     LoopConfig(steps=1, batch_size=3, out=str(jsonl / "run")))
    assert len(task.train_set) == 9 and len(task.eval_set) == 1  # the first tenth is held out
    item = task.train_set[0]  # line 1 (0-based): 80 x 72 image
    b = task.collate([item])
    assert b["images"].shape == (1, 3, 72, 80)
    ids = b["input_ids"][0].tolist()
    assert ids[0] == 0 and ids[-1] == 2  # RoBERTa's <s> ... </s>
    dec = task.tokenizer.tokenizer.decode
    for p, (s, e) in enumerate(item["phrases"]):
        toks = [i for i, on in zip(ids, b["phrase_maps"][0, p].tolist()) if on]
        assert dec(toks).strip() == item["caption"][s:e]
    # boxes: pixel xyxy -> normalised cx, cy, w, h (hand computation for line 1: [5, 6, 31, 34] on 80 x 72)
    torch.testing.assert_close(b["boxes"][0][0], torch.tensor([18 / 80, 20 / 72, 26 / 80, 28 / 72]))
    assert torch.equal(b["token_maps"][0], b["phrase_maps"][0, :, : len(ids)].bool())


def test_long_captions_are_cut_to_the_text_encoder_positions(jsonl):
    tok = _roberta_tokenizer(str(jsonl / "tok"))
    coll = Collate(tok, 256, max_tokens=6)
    item = {"image": torch.zeros(3, 8, 8), "caption": "a red square left of a blue circle", "phrases": [(0, 12)],
            "boxes": torch.tensor([[0.0, 0.0, 4.0, 4.0]]), "box_phrase": torch.tensor([0])}
    b = coll([item])
    assert b["input_ids"].shape == (1, 6) and b["input_ids"][0, -1] == 2
    assert b["phrase_maps"][0, 0, :6].sum() > 0


def test_tokenizer_errors(jsonl, tmp_path_factory):
    other = tmp_path_factory.mktemp("bert_like")
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(["a red square"], vocab_size=270, special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
    tok.save_model(str(other))
    with pytest.raises(ValueError, match="expected '<pad>' at id 1 .* got 0"):
        _roberta_tokenizer(str(other))
    with pytest.raises(ValueError, match="expected a folder with vocab.json \\+ merges.txt"):
        _roberta_tokenizer(str(jsonl / "images"))
    tok.save(str(other / "tokenizer.json"))
    with pytest.raises(ValueError, match="got 0"):
        _roberta_tokenizer(str(other / "tokenizer.json"))


def test_train_and_evaluate_from_jsonl_through_the_cli(jsonl, capsys):
    out = jsonl / "run"
    args = ["train", "mdetr", "--preset", "tiny", "--data", str(jsonl / "data.jsonl"), "--tokenizer",
            str(jsonl / "tok"), "--steps", "2", "--batch-size", "3", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == [1, 2] and all(r["contrastive"] > 0 and r["l1"] > 0 for r in train)
    ev = [r for r in rows if "eval/recall@1" in r][-1]
    assert 0 <= ev["eval/recall@1"] <= ev["eval/recall@5"] <= 1
    assert (out / "mdetr_grounding.png").stat().st_size > 0
    capsys.readouterr()
    assert main(["eval", "--run", str(out), "--device", "cpu"]) == 0
    assert "recall@1" in capsys.readouterr().out


def test_the_documented_example_line_parses(tmp_path):
    from polymodal.data.grounding import GroundingJSONL

    line = {"image": "images/0001.jpg", "caption": "a man in a red shirt holds a dog",  # docs/models/mdetr.md
            "phrases": [{"start": 0, "end": 20, "boxes": [[12, 30, 140, 260]]},
                        {"start": 27, "end": 32, "boxes": [[150, 120, 230, 250]]}]}
    (tmp_path / "images").mkdir()
    Image.new("RGB", (320, 280)).save(tmp_path / "images" / "0001.jpg")
    (tmp_path / "d.jsonl").write_text(json.dumps(line) + "\n")
    item = GroundingJSONL(tmp_path / "d.jsonl")[0]
    assert [item["caption"][s:e] for s, e in item["phrases"]] == ["a man in a red shirt", "a dog"]
    assert item["image"].shape == (3, 280, 320) and item["box_phrase"].tolist() == [0, 1]
