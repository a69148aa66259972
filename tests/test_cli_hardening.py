"""The command line keeps runs safe and answers user errors in one line (issue 12): nothing
overwritten or deleted, one run per directory, resume checks and config history, a failed save,
flag ranges, bad files and options as ``polymodal: error: ...`` with exit status 2."""

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from polymodal.cli import _summary, main
from polymodal.train import metrics as metrics_mod
from polymodal.train.metrics import read_metrics

FAST = ["--batch-size", "8", "--train-size", "16", "--eval-size", "8", "--no-progress"]


def one_error(capsys, *needles):
    """The captured stderr is one ``polymodal: error:`` line (no traceback) containing ``needles``."""
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err and lines and lines[-1].startswith("polymodal: error: "), err
    for n in needles:
        assert n in lines[-1], (n, lines[-1])
    return lines[-1]


def snapshot(d):
    return {os.path.relpath(os.path.join(r, f), d): open(os.path.join(r, f), "rb").read()
            for r, _, fs in os.walk(d) for f in fs}


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory):
    """A one-step CLIP run (ViT tower) with one checkpoint; tests copy it before changing anything."""
    out = tmp_path_factory.mktemp("h") / "clip"
    assert main(["train", "clip", "--preset", "tiny-vit", *FAST, "--steps", "1", "--warmup", "5",
                 "--out", str(out)]) == 0
    return out


def test_a_run_directory_is_never_overwritten_or_deleted(clip_run, tmp_path, capsys):
    before = snapshot(clip_run)
    # the classifier over the CLIP run it starts from: refused, the CLIP run untouched
    assert main(["train", "classifier", "--init-from", str(clip_run), *FAST, "--steps", "1",
                 "--out", str(clip_run)]) == 2
    one_error(capsys, str(clip_run), "--resume", "new --out")
    assert main(["train", "clip", "--preset", "tiny-vit", *FAST, "--steps", "1", "--out", str(clip_run)]) == 2
    one_error(capsys, "already holds a clip tiny-vit run")
    from polymodal.demo import main as demo

    assert demo(["--steps", "1", "--out", str(clip_run)]) == 2  # the demo refuses too, deleting nothing
    one_error(capsys, "--resume")
    assert snapshot(clip_run) == before
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert main(["train", "clip", *FAST, "--steps", "1", "--out", str(foreign)]) == 2
    one_error(capsys, "not empty", "notes.txt")
    assert os.listdir(foreign) == ["notes.txt"]
    assert main(["train", "clip", *FAST, "--steps", "1", "--out", str(foreign / "notes.txt")]) == 2
    one_error(capsys, "is a file", "notes.txt")


def test_classifier_records_the_preset_it_trained_and_plots_epsilon(clip_run, tmp_path, capsys):
    out = tmp_path / "cls"
    assert main(["train", "classifier", "--init-from", str(clip_run), "--preset", "tiny", *FAST, "--steps", "1",
                 "--dp", "--noise-multiplier", "1.0", "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["preset"] == "tiny-vit"  # --init-from's preset won
    assert [r["epsilon"] > 0 for r in read_metrics(out) if "loss" in r] == [True]
    assert (out / "curves.png").stat().st_size > 1000
    assert main(["train", "classifier", *FAST, "--dp", "--noise-multiplier", "0", "--out", str(tmp_path / "x")]) == 2
    one_error(capsys, "--noise-multiplier", "> 0")
    assert not (tmp_path / "x").exists()


def test_resume_names_a_wrong_path_or_a_missing_checkpoint_and_records_changed_settings(clip_run, tmp_path, capsys):
    assert main(["train", "clip", *FAST, "--resume", "--out", str(tmp_path / "typo")]) == 2
    one_error(capsys, "--resume", "typo")
    empty = tmp_path / "started"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps({"family": "clip", "preset": "tiny"}))
    (empty / "metrics.jsonl").write_text("")
    assert main(["train", "clip", *FAST, "--resume", "--out", str(empty)]) == 2
    one_error(capsys, "no checkpoint", "checkpoints")
    run = tmp_path / "run"
    shutil.copytree(clip_run, run)
    assert main(["train", "clip", "--preset", "tiny-vit", *FAST, "--steps", "2", "--warmup", "5", "--lr", "1e-3",
                 "--resume", "--out", str(run)]) == 0
    assert "warning: --warmup 5 exceeds the run's 2 steps" in capsys.readouterr().out
    saved = json.loads((run / "config.json").read_text())
    assert saved["lr"] == 1e-3 and saved["steps"] == 2
    assert saved["config_history"] == [{"step": 1, "changed": {"lr": {"from": 2e-3, "to": 1e-3},
                                                               "steps": {"from": 1, "to": 2}}}]


def test_disk_full_during_a_save_is_one_line_naming_the_intact_step(clip_run, tmp_path, capsys, monkeypatch):
    from polymodal.train.checkpoint import file

    run = tmp_path / "run"
    shutil.copytree(clip_run, run)

    def full(tensors, path, metadata):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(file, "_save_file", full)
    assert main(["train", "clip", "--preset", "tiny-vit", *FAST, "--steps", "2", "--warmup", "5", "--resume",
                 "--out", str(run)]) == 2
    one_error(capsys, "ckpt-00000002", "No space left on device", "step 1 is still intact")
    assert sorted(os.listdir(run / "checkpoints")) == ["ckpt-00000001.safetensors", "latest.json"]


HOLDER = textwrap.dedent("""
    import sys
    from polymodal.train.rundir import RunLock
    RunLock(sys.argv[1]).acquire()
    print("held", flush=True)
    sys.stdin.read()
""")


def test_a_second_run_on_the_same_out_is_refused(tmp_path, capsys):
    out = tmp_path / "busy"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        assert main(["train", "clip", *FAST, "--steps", "1", "--out", str(out)]) == 2
        one_error(capsys, "in use by another run", f"pid {proc.pid}")
        assert sorted(os.listdir(out)) == [".polymodal.lock"]  # nothing written by the refused run
    finally:
        proc.kill()
        proc.wait()


def test_damaged_run_files_are_one_line_naming_the_file(clip_run, tmp_path, capsys):
    bad = {"config.json": b"{not json", "checkpoints/latest.json": b"\xff\xfe",
           "checkpoints/ckpt-00000001.safetensors": None}
    for name, data in bad.items():
        run = tmp_path / name.replace("/", "_")
        shutil.copytree(clip_run, run)
        if data is None:  # truncated
            with open(run / name, "r+b") as f:
                f.truncate(1000)
        else:
            (run / name).write_bytes(data)
        assert main(["eval", "--run", str(run)]) == 2
        one_error(capsys, os.path.basename(name))
        args = ["train", "clip", "--preset", "tiny-vit", *FAST, "--steps", "2", "--resume", "--out", str(run)]
        config = (run / "config.json").read_bytes()
        assert main(args) == 2
        one_error(capsys, os.path.basename(name))
        assert (run / "config.json").read_bytes() == config  # a resume that failed records nothing


def test_bad_data_files_template_and_nproc_are_one_line(clip_run, tmp_path, capsys):
    empty, latin = tmp_path / "empty.jsonl", tmp_path / "latin.jsonl"
    empty.write_text("")
    latin.write_bytes(b'{"image": "a.png", "caption": "caf\xe9"}\n')
    for data in (empty, latin):
        assert main(["train", "clip", *FAST, "--steps", "1", "--data", str(data), "--out", str(tmp_path / "o")]) == 2
        one_error(capsys, str(data))
    for template in ("{x}", "{} and {}", "a {", "no placeholder"):
        assert main(["zero-shot", "--run", str(clip_run), "--image", str(empty), "--labels", "a,b",
                     "--template", template]) == 2
        one_error(capsys, "--template")
    assert main(["train", "clip", *FAST, "--batch-size", "16", "--nproc", "3", "--out", str(tmp_path / "n")]) == 2
    one_error(capsys, "--nproc 3", "--batch-size 16")
    assert not (tmp_path / "n").exists()


@pytest.mark.parametrize("flag,value", [("--epochs", "0"), ("--epochs", "-1"), ("--lr", "-1e-3"), ("--lr", "nan"),
                                        ("--lr", "inf"), ("--warmup", "-1"), ("--weight-decay", "-0.1"),
                                        ("--workers", "-2"), ("--eval-every", "-1"), ("--save-every", "-5"),
                                        ("--checkpointing", "-1"), ("--min-lr", "-1")])
def test_flags_out_of_range_are_refused_by_the_parser(flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "clip", *FAST, f"{flag}={value}", "--out", "never-created"])
    assert e.value.code == 2
    one_error(capsys, f"argument {flag}", repr(value))
    assert not os.path.exists("never-created")


def test_without_matplotlib_one_warning_and_the_summary_says_no_plot(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    monkeypatch.setattr(metrics_mod, "_warned_no_plot", False)
    records = [{"step": 1, "loss": 1.0}]
    assert metrics_mod.plot_metrics(records, tmp_path / "curves.png") is None
    assert metrics_mod.plot_metrics(records, tmp_path / "curves.png") is None
    err = capsys.readouterr().err
    assert err.count("matplotlib is not installed") == 1 and not (tmp_path / "curves.png").exists()
    _summary(str(tmp_path), {"eval/acc": 0.5})
    out = capsys.readouterr().out
    assert "curves.png" not in out and "plot:       none (matplotlib is not installed)" in out


@pytest.mark.distributed
def test_ranks_agree_on_a_refusal_and_a_locked_out_is_refused_before_spawning(clip_run, tmp_path):
    """Under a torchrun of the user's own, rank 0 checks --out and every rank leaves with its answer
    (no hang, no traceback); with --nproc the check and the lock happen before the ranks start."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["train", "clip", "--preset", "tiny-vit", *FAST, "--steps", "1", "--out", str(clip_run)]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                        "-m", "polymodal.cli", *args], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode != 0 and "polymodal/cli.py" not in r.stderr, r.stderr[-3000:]  # no traceback of ours
    assert r.stderr.count("polymodal: error: --out") == 2, r.stderr[-3000:]  # both ranks, one line each
    out = tmp_path / "busy"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        r = subprocess.run([sys.executable, "-m", "polymodal.cli", "train", "clip", *FAST, "--steps", "1",
                            "--nproc", "2", "--out", str(out)], capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("polymodal: error: --out")
        assert "in use by another run" in r.stderr and "torch.distributed" not in r.stderr  # no rank started
        # an error the ranks find themselves: one line from each, one from the launcher, no traceback
        r = subprocess.run([sys.executable, "-m", "polymodal.cli", "train", "clip", *FAST, "--steps", "1",
                            "--nproc", "2", "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "m")],
                           capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
        assert r.stderr.count("polymodal: error: --data: no such file") == 2
        assert r.stderr.strip().splitlines()[-1].startswith("polymodal: error: 2 of 2 processes failed")
    finally:
        proc.kill()
        proc.wait()


def test_the_demo_picks_a_free_folder_and_never_deletes_one(tmp_path, monkeypatch):
    import polymodal.demo as demo

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "demo" / "checkpoints").mkdir(parents=True)
    (tmp_path / "runs" / "demo" / "config.json").write_text("{}")
    (tmp_path / "runs" / "demo-2").mkdir()
    seen = []
    monkeypatch.setattr(demo, "cli", lambda argv: seen.append(argv) or 2)  # stop before training
    assert demo.main(["--steps", "1"]) == 2
    assert seen[0][seen[0].index("--out") + 1] == "runs/demo-3"
    assert (tmp_path / "runs" / "demo" / "config.json").exists() and (tmp_path / "runs" / "demo-2").is_dir()
