"""Two gloo CPU ranks, each with half the batch: the queues receive every rank's momentum features in rank
order, so the state after the step equals one process's step on the whole batch. Sharded training
(``polymodal train albef --nproc 2 --shard``) through the command line equals the same two steps in one
process, and a sharded, activation-checkpointed run stopped and resumed equals the uninterrupted one."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import socket
import subprocess
import sys
import tempfile

import pytest
import torch

from polymodal.core import pytree
from polymodal.core import random as pr
from polymodal.models.albef.builders import albef_tiny
from polymodal.models.albef.momentum import enqueue
from polymodal.train.loop import LoopConfig, train
from polymodal.train.metrics import read_metrics
from polymodal.train.runs import load_run
from polymodal.train.task import LossOutput, make_task

W, B = 2, 2
SPEC = albef_tiny(queue_size=8, vision_layers=1, text_layers=1, multimodal_layers=1, mlm=False)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data():
    images = pr.normal(pr.key(3), (W * B, 3, 32, 32))
    ids = pr.randint(pr.key(4), (W * B, 6), 5, 60)
    ids[:, 0] = 2
    return images, ids, torch.ones_like(ids), torch.arange(W * B) + 10


def _worker(rank, port, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=W,
                            timeout=datetime.timedelta(seconds=60))
    try:
        params = SPEC.init(key=pr.key(0))
        state = SPEC.initial_state(params, key=pr.key(1))
        images, ids, mask, idx = (t[rank * B:(rank + 1) * B] for t in _data())
        _, new = SPEC(params, images, ids, mask, idx, state, key=pr.key(2))
        torch.save(pytree.flatten(new), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.slow  # two spawned ranks import polymodal again: over this family's 60 s test budget on a shared CPU
def test_two_ranks_enqueue_the_gathered_global_batch():
    with tempfile.TemporaryDirectory() as d:
        torch.multiprocessing.spawn(_worker, args=(_free_port(), d), nprocs=W, join=True)
        ranks = [torch.load(os.path.join(d, f"rank{r}.pt")) for r in range(W)]
    params = SPEC.init(key=pr.key(0))
    state = SPEC.initial_state(params, key=pr.key(1))
    _, whole = SPEC(params, *_data(), state, key=pr.key(2))
    whole = pytree.flatten(whole)
    for got in ranks:
        assert got["queue_ptr"].tolist() == [W * B]
        assert got["idx_queue"][0, :W * B].tolist() == list(range(10, 10 + W * B))
        for k in ("image_queue", "text_queue", "momentum.text_proj.weight"):
            torch.testing.assert_close(got[k], whole[k], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------- sharded training (--shard)

CLI = ["--preset", "tiny", "--nproc", "2", "--steps", "2", "--batch-size", "16", "--train-size", "64", "--eval-size",
       "8", "--eval-every", "0", "--no-progress"]


class _TwoRanksInOneProcess:
    """The loop's data-parallel ALBEF step in one process: each global batch as the two ranks' halves, the
    loss their mean (each rank's loss is over its half: ITC against its batch and the queue, in-batch hard
    negatives), the same step key for both (as the loop gives every rank), the momentum copies of either
    half (equal) and the queues fed with both halves' momentum features in rank order."""

    def __init__(self, task):
        self.task, self.name, self.steps, self.model = task, task.name, task.steps, task.model
        self.run_config = task.run_config

    def init(self, key):
        return self.task.init(key)

    def train_batches(self, start, rank, world):
        assert (rank, world) == (0, 1)
        return zip(self.task.train_batches(start, 0, 2), self.task.train_batches(start, 1, 2))

    def loss(self, params, state, batches, key):
        outs = [self.task.loss(params, state, b, key) for b in batches]
        n, p = batches[0]["idx"].shape[0], int(state["queue_ptr"])
        cols = lambda q: torch.cat([o.state[q][:, p:p + n] for o in outs], dim=1).T  # noqa: E731
        new = enqueue({**state, "momentum": outs[0].state["momentum"]}, cols("image_queue"), cols("text_queue"),
                      torch.cat([b["idx"] for b in batches]))
        return LossOutput(sum(o.loss for o in outs) / len(outs), outs[0].metrics, new)

    def evaluate(self, params, state, *, device):
        return self.task.evaluate(params, state, device=device)


def _cli(out, *extra):
    r = subprocess.run([sys.executable, "-m", "polymodal.cli", "train", "albef", *CLI, "--out", str(out), *extra],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r.stdout


def _records(run):
    return [r for r in read_metrics(run) if "loss" in r]


def _assert_close_trees(a, b, what, atol=1e-5):
    fa, fb = pytree.flatten(a), pytree.flatten(b)
    assert fa.keys() == fb.keys(), what
    for k in fb:
        assert type(fa[k]) is torch.Tensor and fa[k].shape == fb[k].shape, f"{what} {k}"
        torch.testing.assert_close(fa[k], fb[k], atol=atol, rtol=atol, msg=lambda m: f"{what} {k}: {m}")


@pytest.mark.distributed
@pytest.mark.slow  # three 2-rank command-line runs (~35 s each on 2 CPU cores)
def test_sharded_cli_run_equals_one_process_and_resumes_exactly(tmp_path):
    out = _cli(tmp_path / "shard", "--shard")
    assert "heldout_itm_image_to_text_R@1" in out and "checkpoint:" in out
    got = load_run(tmp_path / "shard")

    # the same two steps in one process (the run's own config, unsharded)
    saved = json.loads((tmp_path / "shard" / "config.json").read_text())
    loop = LoopConfig(**{f.name: saved[f.name] for f in dataclasses.fields(LoopConfig)})
    loop = dataclasses.replace(loop, shard=False, out=str(tmp_path / "ref"), progress=False)
    opts = {k: saved[k] for k in ("train_size", "eval_size", "alpha", "mlm", "max_length")}
    train(_TwoRanksInOneProcess(make_task("albef", "tiny", opts, loop)), loop)
    ref = load_run(tmp_path / "ref")

    for a, b in zip(_records(tmp_path / "shard"), _records(tmp_path / "ref"), strict=True):
        for k in ("loss", "itc", "itm", "mlm"):  # the loss averaged over ranks; the rest rank 0's
            assert a[k] == pytest.approx(b[k], abs=1e-5, rel=1e-6), (a["step"], k)
    _assert_close_trees(got.params, ref.params, "param")
    _assert_close_trees(got.state, ref.state, "state")
    assert got.state["queue_ptr"].tolist() == [32]
    assert torch.equal(got.state["idx_queue"], ref.state["idx_queue"])  # both halves of both steps, rank order
    assert not torch.equal(got.state["momentum"]["text_proj"]["weight"], got.params["text_proj"]["weight"])

    # sharded with activation checkpointing, stopped after one step and resumed: the uninterrupted run
    _cli(tmp_path / "resumed", "--shard", "--checkpointing", "1", "--stop-after", "1")
    _cli(tmp_path / "resumed", "--shard", "--checkpointing", "1", "--resume")
    again = load_run(tmp_path / "resumed")
    assert [r["loss"] for r in _records(tmp_path / "resumed")] == pytest.approx(
        [r["loss"] for r in _records(tmp_path / "shard")], abs=1e-5, rel=0)
    _assert_close_trees(again.params, got.params, "resumed param")
    _assert_close_trees(again.state, got.state, "resumed state")
