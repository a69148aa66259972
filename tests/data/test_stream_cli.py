"""``polymodal train clip --data 'shards-{...}.tar' --train-num-samples N``: streamed and resumable."""

import numpy as np
import pytest
import torch
from PIL import Image

from polymodal.cli import main
from polymodal.core.pytree import flatten
from polymodal.train.metrics import read_metrics

wds = pytest.importorskip("webdataset")

COMMON = ["--preset", "tiny", "--batch-size", "16", "--train-num-samples", "64", "--warmup", "1", "--eval-every", "0",
          "--save-every", "2", "--no-progress"]


@pytest.fixture
def shards(tmp_path):
    rng = np.random.default_rng(0)
    words = ["red", "green", "blue", "circle", "square", "a", "small", "large"]
    for s, n in enumerate((30, 34)):
        with wds.TarWriter(str(tmp_path / f"shard-{s:06d}.tar")) as sink:
            for i in range(n):
                image = Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))
                sink.write({"__key__": f"s{s}-{i:03d}", "png": image, "txt": " ".join(rng.choice(words, 4))})
    return str(tmp_path / "shard-{000000..000001}.tar")


def _losses(run):
    return [r["loss"] for r in read_metrics(run) if "loss" in r]


def test_shards_train_and_resume_equals_the_uninterrupted_run(tmp_path, shards):
    from polymodal.train.loop import load_run

    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["train", "clip", *COMMON, "--data", shards, "--steps", "6", "--out", str(a)]) == 0
    assert main(["train", "clip", *COMMON, "--data", shards, "--steps", "6", "--stop-after", "2", "--out", str(b)]) == 0
    assert len(_losses(b)) == 2
    # the resumed half reads the shards with 2 DataLoader workers: the same batches all the same
    assert main(["train", "clip", *COMMON, "--data", shards, "--steps", "6", "--workers", "2", "--out", str(b),
                 "--resume"]) == 0
    la, lb = _losses(a), _losses(b)
    assert len(la) == 6 and la == lb  # the same data (epoch 0 and into epoch 1), keys and optimizer state
    pa, pb = flatten(load_run(a).params), flatten(load_run(b).params)
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)


def test_shard_errors_name_the_problem(tmp_path, shards, capsys):
    out = str(tmp_path / "run")
    assert main(["train", "clip", "--preset", "tiny", "--data", shards, "--steps", "1", "--out", out]) == 2
    assert "--train-num-samples" in capsys.readouterr().err
    missing = str(tmp_path / "nope-{0..3}.tar")
    assert main(["train", "clip", *COMMON, "--data", missing, "--steps", "1", "--out", out]) == 2
    assert f"no shard matches {missing!r}" in capsys.readouterr().err
