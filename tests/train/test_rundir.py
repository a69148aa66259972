"""Run directories: refusals, the lock (two processes), config history, corrupt-latest fallback,
a failed save naming the intact step, and the writer's temp files."""

import errno
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from polymodal.train.checkpoint import CheckpointError, CheckpointSaveError, RunDir
from polymodal.train.rundir import LOCK_NAME, RunDirError, RunLock, check_out, record_config
from polymodal.train.runs import load_training_checkpoint

P = {"w": torch.arange(3.0)}


def test_check_out_refuses_what_it_would_overwrite_and_names_the_way_on(tmp_path):
    check_out(tmp_path / "new", resume=False)  # a new or empty directory is fine
    check_out(tmp_path, resume=False)
    (tmp_path / "f").write_text("x")
    with pytest.raises(RunDirError, match=r"is a file.*another --out"):
        check_out(tmp_path / "f", resume=False)
    with pytest.raises(RunDirError, match=r"not empty and holds no polymodal run \(f\)"):
        check_out(tmp_path, resume=False)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"family": "clip", "preset": "tiny"}))
    check_out(run, resume=False)  # only the config of a start that failed before its first step
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    with pytest.raises(RunDirError, match=r"holds a clip tiny run \(config.json, metrics.jsonl\).*--resume.*new --out"):
        check_out(run, resume=False)
    with pytest.raises(RunDirError, match=r"--resume: no checkpoint in .*checkpoints"):
        check_out(run, resume=True, family="clip")
    with pytest.raises(RunDirError, match=r"--resume: no run directory .*typo"):
        check_out(tmp_path / "typo", resume=True)
    RunDir(run / "checkpoints").save(1, P)
    check_out(run, resume=True, family="clip")
    with pytest.raises(RunDirError, match=r"holds a family 'clip' run, not 'classifier'"):
        check_out(run, resume=True, family="classifier")
    (run / "config.json").write_bytes(b"\xff{")
    with pytest.raises(RunDirError, match=r"unreadable run config .*config.json"):
        check_out(run, resume=True, family="clip")


HOLDER = textwrap.dedent("""
    import sys
    from polymodal.train.rundir import RunLock
    lock = RunLock(sys.argv[1])
    lock.acquire()
    print("held", flush=True)
    sys.stdin.read()  # until the test closes stdin (or kills us)
    lock.release()
""")


def _holder(out):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_lock_refuses_a_second_process_and_takes_over_from_a_dead_one(tmp_path):
    proc = _holder(tmp_path)
    try:
        with pytest.raises(RunDirError, match=rf"in use by another run \(pid {proc.pid} on "):
            RunLock(tmp_path).acquire()
    finally:
        proc.kill()  # dies holding the lock: the file still names it, the kernel dropped the flock
        proc.wait()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == proc.pid  # a stale lock file
    with RunLock(tmp_path) as lock:  # taken over
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
        with RunLock(tmp_path):  # re-entrant within the process
            pass
        other = subprocess.run([sys.executable, "-c", HOLDER, str(tmp_path)], input="", capture_output=True,
                               text=True, timeout=60)
        assert other.returncode != 0 and f"pid {os.getpid()}" in other.stderr
    proc = _holder(tmp_path)  # released on exit: another process gets it
    proc.communicate("")
    assert proc.returncode == 0
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirError, match=r"cannot create the run directory"):
        RunLock(tmp_path / "file" / "run").acquire()


def test_record_config_keeps_the_history_of_changed_settings(tmp_path):
    first = {"family": "clip", "lr": 0.002, "steps": 4, "out": "a", "progress": True}
    assert record_config(tmp_path, first) == first
    second = {**first, "lr": 0.001, "steps": 6, "out": "b", "progress": False}
    record_config(tmp_path, second, resumed_at=2)
    record_config(tmp_path, second, resumed_at=4)  # nothing changed: nothing recorded
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["lr"] == 0.001 and saved["steps"] == 6  # the config in force
    assert saved["config_history"] == [{"step": 2, "changed": {"lr": {"from": 0.002, "to": 0.001},
                                                               "steps": {"from": 4, "to": 6}}}]


def _corrupt(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupt_latest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, capsys):
    runs = RunDir(tmp_path, keep=None)
    for step in (1, 2, 3):
        runs.save(step, {"w": torch.full((3,), float(step))})
    _corrupt(runs.file(3))
    _corrupt(runs.file(2))
    ck = load_training_checkpoint(runs, like=P)
    assert ck.step == 1 and torch.equal(ck.params["w"], torch.ones(3))
    err = capsys.readouterr().err
    assert "ckpt-00000003.safetensors" in err and "using step 1" in err
    only = RunDir(tmp_path / "one")
    only.save(1, P)
    _corrupt(only.file(1))
    with pytest.raises(CheckpointError, match="ckpt-00000001"):
        load_training_checkpoint(only, like=P)
    with pytest.raises(CheckpointError, match="shape"):  # a mismatch is no corruption: no fallback
        load_training_checkpoint(runs, 1, like={"w": torch.zeros(4)})


def test_disk_full_during_a_save_names_the_failed_file_and_the_intact_step(tmp_path, monkeypatch):
    from polymodal.train.checkpoint import file

    runs = RunDir(tmp_path)
    runs.save(1, P)

    def full(tensors, path, metadata):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(file, "_save_file", full)
    with pytest.raises(CheckpointSaveError) as e:  # an OSError
        runs.save(2, P)
    msg = str(e.value)
    assert "\n" not in msg and "ckpt-00000002" in msg and "No space left on device" in msg
    assert "step 1 is still intact" in msg
    assert sorted(os.listdir(tmp_path)) == ["ckpt-00000001.safetensors", "latest.json"]
    assert runs.latest().step == 1


KILLED = textwrap.dedent("""
    import os, sys, torch, safetensors.torch
    from polymodal.train.checkpoint import RunDir
    real = safetensors.torch.save_file
    def killed(tensors, target, metadata=None):  # the writer's own temp beside its target, then SIGKILL
        with open(os.path.join(os.path.dirname(target), ".tmpAbC123"), "wb") as f:
            f.write(b"half a checkpoint")
        os._exit(9)
    safetensors.torch.save_file = killed
    RunDir(sys.argv[1]).save(2, {"w": torch.ones(3)})
""")


def test_a_kill_during_a_save_leaves_only_temp_names_we_own_and_the_next_save_removes_them(tmp_path):
    runs = RunDir(tmp_path)
    runs.save(1, P)
    proc = subprocess.run([sys.executable, "-c", KILLED, str(tmp_path)], capture_output=True, timeout=60)
    assert proc.returncode == 9
    left = sorted(set(os.listdir(tmp_path)) - {"ckpt-00000001.safetensors", "latest.json"})
    assert left and all(re.fullmatch(r"\.tmp-[0-9a-f]{8}ckpt-00000002\.safetensors(\.d)?", n) for n in left), left
    (tmp_path / ".tmpXyZ789").write_bytes(b"left by an older polymodal")  # safetensors' own name, top level
    (tmp_path / "notes.txt").write_text("not a temp file")
    runs.save(2, P)
    assert sorted(os.listdir(tmp_path)) == ["ckpt-00000001.safetensors", "ckpt-00000002.safetensors",
                                            "latest.json", "notes.txt"]
    assert runs.load(like=P).step == 2
