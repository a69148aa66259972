"""Checkpoints never run code from a run directory, and are written with the usual file mode."""

from __future__ import annotations

import os
import pickle
import shutil

import pytest
import torch

from polymodal.train.checkpoint import CheckpointError, consolidate, load_sharded, save_sharded
from polymodal.train.checkpoint.dcp_metadata import SafeFileSystemReader, UnsafeMetadataError, load_metadata


class _RunsCode:
    """Unpickling this runs ``os.system(cmd)`` (what an attacker would put in ``.metadata``)."""

    def __init__(self, cmd: str):
        self.cmd = cmd

    def __reduce__(self):
        return os.system, (self.cmd,)


def _tamper(d: str, marker: str, nested: bool) -> None:
    """Replace ``d/.metadata`` with a pickle that touches ``marker`` when loaded."""
    path = os.path.join(d, ".metadata")
    payload = _RunsCode(f"touch {marker}")
    if nested:  # hidden inside an otherwise real Metadata object
        md = load_metadata(path)
        md.planner_data = {"x": payload}
        payload = md
    with open(path, "wb") as f:
        pickle.dump(payload, f)


@pytest.fixture
def sharded(tmp_path):
    d = str(tmp_path / "dcp")
    p = {"w": torch.arange(6.0).reshape(3, 2), "b": torch.ones(2)}
    save_sharded(d, p, extra={"epoch": 1}, step=4)
    return d, p


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("where", ["load_sharded", "consolidate", "old_fallback"])
def test_crafted_metadata_is_refused_and_runs_nothing(sharded, tmp_path, where, nested):
    d, p = sharded
    marker = str(tmp_path / "pwned")
    if where == "old_fallback":  # a crash between moving the old checkpoint aside and renaming the new one
        os.replace(d, d + ".old")
        _tamper(d + ".old", marker, nested)
    else:
        _tamper(d, marker, nested)
    with pytest.raises(CheckpointError, match=r"refusing to load global (posix|nt|os)\.system"):
        if where == "consolidate":
            consolidate(d, str(tmp_path / "one.safetensors"))
        else:
            load_sharded(d, like={k: torch.zeros_like(v) for k, v in p.items()})
    assert not os.path.exists(marker)
    assert not os.path.exists(tmp_path / "one.safetensors")


def test_safe_reader_refuses_directly(sharded, tmp_path):
    d, _ = sharded
    marker = str(tmp_path / "pwned")
    _tamper(d, marker, nested=False)
    with pytest.raises(UnsafeMetadataError, match="system"):
        SafeFileSystemReader(d).read_metadata()
    assert not os.path.exists(marker)


def test_storage_path_outside_directory_is_refused(sharded):
    d, _ = sharded
    path = os.path.join(d, ".metadata")
    md = load_metadata(path)
    for info in md.storage_data.values():
        info.relative_path = "../../etc/passwd"
    with open(path, "wb") as f:
        pickle.dump(md, f)
    with pytest.raises(UnsafeMetadataError, match="not a file name inside the checkpoint directory"):
        load_metadata(path)


def test_real_sharded_checkpoint_still_loads(sharded, tmp_path):
    d, p = sharded
    ck = load_sharded(d, like={k: torch.zeros_like(v) for k, v in p.items()})
    assert ck.step == 4 and ck.extra == {"epoch": 1}
    assert torch.equal(ck.params["w"], p["w"]) and torch.equal(ck.params["b"], p["b"])
    shutil.move(d, d + ".old")
    assert torch.equal(load_sharded(d, like={k: torch.zeros_like(v) for k, v in p.items()}).params["w"], p["w"])


def _save_two_rank(mesh, d):
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    torch.set_num_threads(1)
    full = {"w": torch.arange(12.0).reshape(4, 3), "s": torch.tensor(2.0), "h": torch.ones(2, dtype=torch.bfloat16)}
    p = {k: distribute_tensor(v, mesh, [Shard(0)] if v.ndim else [Replicate()]).requires_grad_(True) for k, v in full.items()}
    opt = torch.optim.AdamW([p["w"], p["s"]], lr=1e-2)
    for k in ("w", "s"):
        p[k].grad = p[k].detach() * 0.5
    opt.step()
    save_sharded(os.path.join(d, "dcp"), p, opt, extra={"world": 2, "key": torch.tensor([1, 2])}, step=3)
    return 0


@pytest.mark.distributed
def test_two_rank_checkpoint_references_only_allowed_globals(tmp_path):
    """A real 2-rank gloo checkpoint (DTensors, optimizer state, extras) passes the restricted reader."""
    from polymodal.train.distributed import run_ranks

    run_ranks(_save_two_rank, 2, str(tmp_path))
    d = str(tmp_path / "dcp")
    seen = set()

    class Recording(pickle.Unpickler):
        def find_class(self, module, name):
            seen.add(f"{module}.{name}")
            return super().find_class(module, name)

    with open(os.path.join(d, ".metadata"), "rb") as f:
        Recording(f).load()
    assert "torch.distributed.checkpoint.metadata.Metadata" in seen
    md = load_metadata(os.path.join(d, ".metadata"))  # every one of `seen` is admitted
    assert "w" in md.state_dict_metadata
    like = {"w": torch.zeros(4, 3), "s": torch.tensor(0.0), "h": torch.zeros(2, dtype=torch.bfloat16)}
    ck = load_sharded(d, like=like)
    assert ck.step == 3 and ck.extra["world"] == 2
    ref = {"w": torch.arange(12.0).reshape(4, 3).requires_grad_(True), "s": torch.tensor(2.0, requires_grad=True)}
    opt = torch.optim.AdamW(list(ref.values()), lr=1e-2)  # the same step on unsharded tensors
    for t in ref.values():
        t.grad = t.detach() * 0.5
    opt.step()
    torch.testing.assert_close(ck.params["w"], ref["w"].detach())
    torch.testing.assert_close(ck.params["s"], ref["s"].detach())
    assert torch.equal(ck.params["h"], torch.ones(2, dtype=torch.bfloat16))


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_files_get_the_umask_mode_not_0600(tmp_path, umask_022):
    from polymodal.core import pytree
    from polymodal.train.checkpoint import RunDir, save_checkpoint

    p = {"w": torch.ones(2, 3)}
    with open(tmp_path / "plain", "w"):
        pass  # what any other new file gets under this umask
    expected = os.stat(tmp_path / "plain").st_mode & 0o777
    assert expected == 0o644
    pytree.save(tmp_path / "params.safetensors", p)
    save_checkpoint(tmp_path / "ckpt.safetensors", p, step=1)
    save_checkpoint(tmp_path / "ckpt.safetensors", p, step=2)  # overwriting too
    save_sharded(str(tmp_path / "dcp"), p)
    consolidate(str(tmp_path / "dcp"), str(tmp_path / "one.safetensors"))
    run = RunDir(str(tmp_path / "run"))
    run.save(1, p)
    written = [tmp_path / n for n in ("params.safetensors", "ckpt.safetensors", "one.safetensors")]
    written += [f for f in (tmp_path / "run").rglob("*") if f.is_file()]
    assert len(written) >= 5
    assert {str(f): oct(os.stat(f).st_mode & 0o777) for f in written} == {str(f): oct(expected) for f in written}
    old = os.umask(0o077)
    try:
        pytree.save(tmp_path / "private.safetensors", p)  # a stricter umask is honoured as well
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "private.safetensors").st_mode & 0o777 == 0o600
