"""Evaluations show progress on a terminal (``polymodal eval`` and the loop's evaluations) and stay
silent in logs."""

import io
import sys

import pytest

from polymodal.core import random as pr
from polymodal.train.loop import LoopConfig
from polymodal.train.task import eval_progress, make_task


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_eval_progress_draws_on_a_terminal_only(monkeypatch):
    tty = _Terminal()
    monkeypatch.setattr(sys, "stderr", tty)
    assert list(eval_progress(range(3), "eval seen")) == [0, 1, 2]
    assert "eval seen" in tty.getvalue() and "0/3" in tty.getvalue()
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    assert list(eval_progress(range(3), "eval seen")) == [0, 1, 2]
    assert log.getvalue() == ""


@pytest.mark.parametrize("family", ["clip", "classifier"])
def test_task_evaluation_shows_a_bar_per_split(monkeypatch, family, tmp_path):
    loop = LoopConfig(steps=1, batch_size=16, out=str(tmp_path / "run"), progress=False)
    task = make_task(family, "tiny-vit", {"train_size": 32, "eval_size": 16}, loop)
    params, state = task.init(pr.key(0))
    tty = _Terminal()
    monkeypatch.setattr(sys, "stderr", tty)
    metrics = task.evaluate(params, state, device="cpu")
    assert metrics and "eval" in tty.getvalue() and "batch" in tty.getvalue()
