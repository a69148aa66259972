"""The one training loop: a family that registers itself trains through the CLI with no central edit;
accumulation, clipping, fp16's scaler, exact resume of a task's own (DP) step; run directories of
the older layout (batch-norm state inside the params) still evaluate and resume."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

from polymodal import registry
from polymodal.cli import main
from polymodal.core import random as pr
from polymodal.core.pytree import flatten
from polymodal.train import LossOutput, option
from polymodal.train.loop import load_run
from polymodal.train.metrics import read_metrics


@dataclass
class ToyOptions:
    slope: float = option(3.0, "the slope to learn")


class ToyTask:
    """Fit ``w`` in ``y = slope * x`` by mean squared error; the state counts the examples seen."""

    Options = ToyOptions
    loop_defaults = {"steps": 30, "batch_size": 8, "lr": 0.1, "weight_decay": 0.0, "eval_every": 0, "save_every": 2,
                     "out": "runs/toy"}
    trainable_presets = ("small",)

    def __init__(self, preset, options, loop):
        self.options, self.loop, self.steps, self.name = options, loop, loop.steps, f"toy-{preset}"

    def init(self, key):
        return {"w": torch.zeros(())}, {"seen": torch.zeros(())}

    def loss(self, params, state, batch, key):
        x = batch["x"]
        return LossOutput(((params["w"] * x - self.options.slope * x) ** 2).mean(), {}, {"seen": state["seen"] + len(x)})

    def batch(self, step):
        return {"x": pr.normal(pr.fold_in(pr.key(self.loop.seed), step), (self.loop.batch_size,))}

    def train_batches(self, start_step, rank, world):
        return (self.batch(s) for s in range(start_step, self.steps))

    def optimizer(self, leaves, loop):  # the task's own optimizer (default: AdamW)
        return torch.optim.SGD(list(leaves.values()), lr=loop.lr)

    def evaluate(self, params, state, *, device):
        return {"eval/error": abs(float(params["w"]) - self.options.slope)}


@pytest.fixture
def toy(monkeypatch):
    registry.families()  # discover the real ones first
    fam = registry.Family("toy", builders={"toy_small": lambda: None, "toy_big": lambda: None},
                          presets={"small": "toy_small", "big": "toy_big"}, task=f"{__name__}:ToyTask",
                          description="a one-parameter regression")
    monkeypatch.setitem(registry._FAMILIES, "toy", fam)
    return fam


def losses(run, key="loss"):
    return [r[key] for r in read_metrics(run) if "loss" in r]


def test_a_registered_family_trains_through_the_cli(tmp_path, toy, capsys):
    out = tmp_path / "toy"
    assert main(["train", "toy", "--slope", "2", "--no-progress", "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["slope"] == 2.0
    err = read_metrics(out)[-1]["eval/error"]
    assert err < 0.3 and losses(out)[-1] < losses(out)[0] / 10
    run = load_run(out)
    assert float(run.state["seen"]) == 30 * 8  # the model state is saved beside the params
    assert abs(float(run.params["w"]) - 2.0) == pytest.approx(err)
    capsys.readouterr()
    assert main(["train", "toy", "--preset", "big", "--out", str(tmp_path / "big")]) == 2
    assert "the toy task cannot train preset 'big'; expected one of ['small']" in capsys.readouterr().err
    assert main(["eval", "--run", str(out)]) == 0 and "error" in capsys.readouterr().out


def test_accumulation_equals_the_whole_batch_and_clipping_reports_the_norm(tmp_path, toy):
    common = ["train", "toy", "--steps", "5", "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    assert main([*common, "--grad-accum", "2", "--out", str(tmp_path / "two")]) == 0
    # equal halves: the mean of the two half-batch means is the batch mean, so the steps agree
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "two")), torch.tensor(losses(tmp_path / "one")))
    assert float(load_run(tmp_path / "two").state["seen"]) == 5 * 8
    assert main([*common, "--clip-grad", "0.01", "--out", str(tmp_path / "clip")]) == 0
    x = ToyTask("small", ToyOptions(), type("L", (), {"seed": 0, "batch_size": 8, "steps": 5})()).batch(0)["x"]
    by_hand = abs(-2 * 3.0 * float((x * x).mean()))  # d/dw mean((w - 3)^2 x^2) at w = 0
    assert losses(tmp_path / "clip", "grad_norm")[0] == pytest.approx(by_hand, rel=1e-5)


def test_fp16_scaler_resumes_exactly(tmp_path, toy):
    common = ["train", "toy", "--steps", "4", "--precision", "fp16", "--device", "cpu", "--no-progress"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert main([*common, "--out", str(a)]) == 0
    assert main([*common, "--stop-after", "3", "--out", str(b)]) == 0
    assert main([*common, "--out", str(b), "--resume"]) == 0
    assert losses(a) == losses(b) and torch.equal(load_run(a).params["w"], load_run(b).params["w"])


def test_dp_classifier_resumes_exactly(tmp_path, capsys):
    common = ["train", "classifier", "--steps", "3", "--batch-size", "8", "--train-size", "32", "--eval-size", "8",
              "--dp", "--noise-multiplier", "1.0", "--save-every", "1", "--no-progress"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert main([*common, "--out", str(a)]) == 0
    assert main([*common, "--stop-after", "2", "--out", str(b)]) == 0
    assert main([*common, "--out", str(b), "--resume"]) == 0
    assert losses(a) == losses(b) and losses(a, "epsilon") == losses(b, "epsilon")  # same noise, same accountant
    pa, pb = flatten(load_run(a).params), flatten(load_run(b).params)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert main([*common, "--grad-accum", "2", "--out", str(tmp_path / "c")]) == 2  # DP takes its own step
    assert "takes its own gradient step" in capsys.readouterr().err


def test_older_run_directory_with_state_inside_the_params_evaluates_resumes_and_converts(tmp_path, capsys):
    from polymodal.train import LoopConfig, make_task
    from polymodal.train.checkpoint import RunDir, load_checkpoint
    from polymodal.train.loop import default_optimizer
    from polymodal.train.runs import convert_legacy

    old = tmp_path / "old"
    loop = LoopConfig(steps=3, batch_size=16, warmup=1)
    task = make_task("clip", "tiny", {"train_size": 64, "eval_size": 16}, loop)
    params, state = task.init(pr.key(5))
    state["visual"]["bn1"]["num_batches_tracked"] += 7  # recognisable statistics
    leaves = {k: v.requires_grad_() for k, v in flatten(params).items()}
    opt = default_optimizer(leaves, loop)
    # what polymodal wrote before: the statistics as a 'bn_state' subtree of the params
    RunDir(old / "checkpoints").save(2, {**params, "bn_state": state}, opt, extra={"preset": "tiny"})
    (old / "config.json").write_text(json.dumps({"preset": "tiny", "data": "synthetic", "seed": 0, "train_size": 64,
                                                 "eval_size": 16, "batch_size": 16, "steps": 3, "warmup": 1}))
    run = load_run(old)
    assert "bn_state" not in run.params and int(run.state["visual"]["bn1"]["num_batches_tracked"]) == 7
    assert main(["eval", "--run", str(old), "--eval-size", "8"]) == 0
    assert "zero_shot_seen" in capsys.readouterr().out
    assert main(["train", "clip", "--preset", "tiny", "--batch-size", "16", "--train-size", "64", "--eval-size", "16",
                 "--steps", "3", "--eval-every", "0", "--no-progress", "--out", str(old), "--resume"]) == 0
    assert [r["step"] for r in read_metrics(old) if "loss" in r] == [3]  # continued from step 2
    assert int(load_run(old).state["visual"]["bn1"]["num_batches_tracked"]) == 8
    # an older file still on disk is rewritten into the current layout
    legacy = tmp_path / "legacy"
    RunDir(legacy / "checkpoints").save(1, {**params, "bn_state": state})
    (legacy / "config.json").write_text((old / "config.json").read_text())
    assert convert_legacy(legacy) == [legacy / "checkpoints" / "ckpt-00000001.safetensors"]
    ck = load_checkpoint(legacy / "checkpoints" / "ckpt-00000001.safetensors")
    assert "bn_state" not in ck.params and int(ck.state["visual"]["bn1"]["num_batches_tracked"]) == 7
