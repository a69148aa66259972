"""Run metrics: an append-only ``metrics.jsonl`` and a PNG plot of the curves."""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

__all__ = ["MetricsLog", "read_metrics", "plot_metrics"]

_warned_no_plot = False


class MetricsLog:
    """Append one JSON object per line; each line is flushed so a killed run keeps what it logged.

    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> log = MetricsLog(d)
    >>> log.write({"step": 1, "loss": 0.5})
    >>> read_metrics(d)
    [{'step': 1, 'loss': 0.5}]
    """

    def __init__(self, run_dir: str | os.PathLike, *, truncate_after: int | None = None) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if truncate_after is not None and self.path.exists():
            # resuming: drop lines logged after the checkpoint we resume from
            kept = [r for r in read_metrics(run_dir) if r.get("step", 0) <= truncate_after]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, self.path)

    def write(self, record: Mapping) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(dict(record)) + "\n")
            f.flush()


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_metrics(records: Iterable[Mapping], out: str | os.PathLike, title: str = "polymodal run") -> Path | None:
    """Loss (left; with DP-SGD also the epsilon spent) and evaluation accuracies/recalls (right)
    against step; ``None`` without matplotlib (a warning once a process says so)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        global _warned_no_plot
        if not _warned_no_plot:  # once a process: the run goes on, the summary leaves the plot out
            _warned_no_plot = True
            print(f"polymodal: warning: matplotlib is not installed, so {os.fspath(out)!r} is not written "
                  "(pip install 'polymodal[plot]')", file=sys.stderr, flush=True)
        return None
    records = list(records)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if any(k.startswith("eval/") for k in r)]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        ax1.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1, label="train loss")
        ax1.set_yscale("log" if all(r["loss"] > 0 for r in train) else "linear")
    ax1.set_xlabel("step")
    ax1.set_ylabel("training loss")
    ax1.grid(alpha=0.3)
    ax1.legend(loc="upper left")
    spent = [(r["step"], r["epsilon"]) for r in train if isinstance(r.get("epsilon"), (int, float))]
    if spent:  # DP-SGD: the privacy budget spent so far, on its own axis
        ax3 = ax1.twinx()
        ax3.plot(*zip(*spent), color="tab:red", lw=1, label="epsilon spent")
        ax3.set_ylabel("epsilon")
        ax3.legend(loc="upper right")
    keys = sorted({k for r in evals for k in r if k.startswith("eval/")})
    for k in keys:
        pts = [(r["step"], r[k]) for r in evals if k in r and isinstance(r[k], (int, float)) and not math.isnan(r[k])]
        if pts:
            ax2.plot(*zip(*pts), marker="o", ms=3, label=k[5:])
    ax2.set_xlabel("step")
    ax2.set_ylabel("accuracy / recall")
    ax2.set_ylim(0, 1.02)
    ax2.grid(alpha=0.3)
    if keys:
        ax2.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    tmp = out.with_name("." + out.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out)
    return out
