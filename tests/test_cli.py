"""The command line end to end on a few steps: train, resume, eval, zero-shot, errors."""

import json
import os
import subprocess
import sys

import pytest
import torch

from polymodal.cli import main
from polymodal.core.pytree import flatten
from polymodal.train.metrics import read_metrics
from polymodal.train.loop import load_run

FAST = ["--preset", "tiny", "--batch-size", "16", "--train-size", "64", "--eval-size", "16", "--warmup", "1",
        "--no-progress"]


def assert_same_tree(a, b):
    fa, fb = flatten(a), flatten(b)
    assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "polymodal.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


def test_train_writes_metrics_plot_checkpoint_and_resume_continues(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "clip", *FAST, "--steps", "3", "--eval-every", "2", "--save-every", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "curves.png" in printed and "zero_shot_seen" in printed
    recs = read_metrics(out)
    assert [r["step"] for r in recs if "loss" in r] == [1, 2, 3]
    assert any("eval/zero_shot_heldout" in r for r in recs)
    assert (out / "curves.png").stat().st_size > 1000
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["step"] == 3
    # a second run into the same directory must not silently overwrite it
    assert main(["train", "clip", *FAST, "--steps", "3", "--out", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err
    # resuming continues from the checkpoint to the new end
    assert main(["train", "clip", *FAST, "--steps", "5", "--eval-every", "0", "--out", str(out), "--resume"]) == 0
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("preset", ["tiny", "tiny-vit"])  # ResNet tower (batch-norm state) and ViT tower
def test_resume_reproduces_the_uninterrupted_run(tmp_path, preset):
    a, b = tmp_path / "a", tmp_path / "b"
    common = [*FAST, "--preset", preset, "--eval-every", "0", "--save-every", "2"]
    assert main(["train", "clip", *common, "--steps", "4", "--out", str(a)]) == 0
    assert main(["train", "clip", *common, "--steps", "4", "--stop-after", "3", "--out", str(b)]) == 0
    assert [r["step"] for r in read_metrics(b) if "loss" in r] == [1, 2, 3]
    assert main(["train", "clip", *common, "--steps", "4", "--out", str(b), "--resume"]) == 0
    la = [r["loss"] for r in read_metrics(a) if "loss" in r]
    lb = [r["loss"] for r in read_metrics(b) if "loss" in r]
    assert la == lb  # same data order, same keys, same optimizer state: the same losses exactly
    ra, rb = load_run(a), load_run(b)
    assert_same_tree(ra.params, rb.params)
    assert_same_tree(ra.state or {}, rb.state or {})
    if preset == "tiny":  # the batch-norm running statistics were saved and resumed too
        assert int(ra.state["visual"]["bn1"]["num_batches_tracked"]) == 4
    else:
        assert ra.state is None and rb.state is None


def test_eval_and_zero_shot(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "clip", *FAST, "--steps", "2", "--eval-every", "0", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["eval", "--run", str(out), "--eval-size", "8"]) == 0
    assert "zero_shot_seen" in capsys.readouterr().out
    from PIL import Image

    img = tmp_path / "x.png"
    Image.new("RGB", (40, 30), (200, 20, 20)).save(img)
    assert main(["zero-shot", "--run", str(out), "--image", str(img), "--labels", "a red circle, a blue square"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all("%" in line for line in lines)
    probs = [float(line.split("%")[0]) for line in lines]
    assert abs(sum(probs) - 100) < 0.1 and probs[0] >= probs[1]


def test_clear_errors(tmp_path, capsys):
    assert main(["zero-shot", "--run", str(tmp_path), "--image", "nope.png", "--labels", "a,b"]) == 2
    assert "no such file 'nope.png'" in capsys.readouterr().err
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    out = tmp_path / "r"
    assert main(["zero-shot", "--run", str(out), "--image", str(bad), "--labels", "a,b"]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert main(["eval", "--run", str(tmp_path)]) == 2
    assert "not a polymodal run directory" in capsys.readouterr().err
    assert main(["train", "clip", "--data", str(tmp_path / "missing.jsonl"), "--out", str(out)]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["train", "clip", "--dp", "--out", str(out)]) == 2
    assert "contrastive loss couples" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "clip", "--steps", "-3"])
    assert "expected a positive integer" in capsys.readouterr().err
    r = run_cli("--help")
    assert r.returncode == 0 and "zero-shot" in r.stdout
    r = run_cli("train", "clip", "--help")
    assert r.returncode == 0 and "--checkpointing" in r.stdout and "--device" in r.stdout and "vit-b32" in r.stdout
    r = run_cli("train", "classifier", "--help")
    assert r.returncode == 0 and "--target-epsilon" in r.stdout and "--init-from" in r.stdout
    r = run_cli("train", "--help")  # the registered families and their presets
    assert r.returncode == 0 and "clip (presets: tiny, tiny-vit" in " ".join(r.stdout.split())
    # unknown family / preset, a device that is not there: one line naming the valid choices, exit 2
    r = run_cli("train", "nope")
    assert r.returncode == 2 and r.stderr.startswith("polymodal: error: ") and "'clip'" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert main(["train", "clip", "--preset", "huge", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("polymodal: error: unknown preset 'huge' for clip") and "'tiny-vit'" in err
    if not torch.cuda.is_available():
        assert main(["train", "clip", "--device", "cuda", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert "no CUDA device" in err and "'cpu'" in err and len(err.strip().splitlines()) == 1


def test_real_data_from_jsonl_with_a_bad_sample(tmp_path, capsys):
    from PIL import Image

    lines = []
    for i in range(6):
        Image.new("RGB", (32, 32), (40 * i, 10, 10)).save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "caption": f"a picture number {i}"}))
    lines.append(json.dumps({"image": "missing.png", "caption": "gone"}))
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    args = ["train", "clip", "--preset", "tiny", "--batch-size", "4", "--steps", "2", "--warmup", "1", "--no-progress",
            "--data", str(tmp_path / "data.jsonl"), "--out", str(tmp_path / "run")]
    assert main(args) == 2  # the missing file is named
    assert "missing.png" in capsys.readouterr().err
    assert main(args + ["--skip-bad"]) == 0


@pytest.mark.distributed
def test_two_processes_and_sharding(tmp_path):
    for extra, name in (([], "ddp"), (["--shard", "--checkpointing", "1"], "fsdp")):
        out = tmp_path / name
        r = run_cli("train", "clip", *FAST, "--steps", "2", "--eval-every", "0", "--nproc", "2", "--out", str(out),
                    *extra, env={"OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr[-3000:]
        assert [x["step"] for x in read_metrics(out) if "loss" in x] == [1, 2]
        assert (out / "checkpoints" / "latest.json").exists()
    # replicated and sharded 2-rank runs see the same data and math: equal first losses
    l1 = [x["loss"] for x in read_metrics(tmp_path / "ddp") if "loss" in x]
    l2 = [x["loss"] for x in read_metrics(tmp_path / "fsdp") if "loss" in x]
    torch.testing.assert_close(torch.tensor(l1), torch.tensor(l2), rtol=1e-4, atol=1e-5)
    # a sharded run stopped after one step and resumed: the same losses and batch-norm statistics
    out = tmp_path / "fsdp_resumed"
    for extra in (["--stop-after", "1"], ["--resume"]):
        r = run_cli("train", "clip", *FAST, "--steps", "2", "--eval-every", "0", "--nproc", "2", "--out", str(out),
                    "--shard", "--checkpointing", "1", *extra, env={"OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr[-3000:]
    assert [x["loss"] for x in read_metrics(out) if "loss" in x] == l2
    assert_same_tree(load_run(tmp_path / "fsdp").state, load_run(out).state)


def test_dp_classifier_logs_epsilon_and_non_dp_learns(tmp_path, capsys):
    out = tmp_path / "dp"
    args = ["train", "classifier", "--steps", "3", "--batch-size", "16", "--train-size", "128", "--eval-size", "32",
            "--no-progress", "--out", str(out)]
    assert main(args + ["--dp", "--target-epsilon", "2.0"]) == 0
    recs = read_metrics(out)
    eps = [r["epsilon"] for r in recs if "loss" in r]
    assert len(eps) == 3 and eps == sorted(eps) and 0 < eps[-1] <= 2.0 + 1e-6
    # the accountant's epsilon for the noise it picked, recomputed independently
    from polymodal.train.dp import epsilon

    final = recs[-1]
    assert abs(epsilon(final["noise_multiplier"], 16 / 128, 3, 1e-5) - final["epsilon"]) < 1e-9
    assert main(args + ["--dp"]) == 2
    assert "exactly one of" in capsys.readouterr().err
    assert main(args + ["--noise-multiplier", "1.0"]) == 2
    # without DP, a few more steps clearly beat chance (1/30)
    out2 = tmp_path / "plain"
    assert main(["train", "classifier", "--steps", "40", "--batch-size", "32", "--train-size", "512",
                 "--eval-size", "120", "--lr", "3e-3", "--no-progress", "--out", str(out2)]) == 0
    assert read_metrics(out2)[-1]["eval/accuracy"] > 0.1  # 3x chance


def test_boolean_options_on_by_default_can_be_turned_off():
    """A task option that defaults to True gets ``--x`` and ``--no-x`` (a plain store_true flag could never
    switch it off); one that defaults to False stays a plain ``--x``."""
    from polymodal.cli import build_parser

    parser = build_parser()
    on = parser.parse_args(["train", "albef", "--preset", "tiny"])
    off = parser.parse_args(["train", "albef", "--preset", "tiny", "--no-mlm", "--all-templates"])
    assert (on.mlm, on.all_templates) == (True, False)
    assert (off.mlm, off.all_templates) == (False, True)
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "albef", "--preset", "tiny", "--no-all-templates"])
