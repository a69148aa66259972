"""Checkpoints: bitwise resume, atomicity under crashes and kills, integrity, run dirs, DCP."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from polymodal.core import random
from polymodal.core.pytree import flatten, leaves, unflatten
from polymodal.train.checkpoint import (
    CheckpointError,
    RunDir,
    consolidate,
    load_checkpoint,
    load_sharded,
    save_checkpoint,
    save_sharded,
    verify,
)
from polymodal.train.checkpoint import file as ckfile
from polymodal.train.checkpoint import run as ckrun
from polymodal.train.checkpoint.optim import optimizer_entries

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ---------------------------------------------------------------- a tiny model and its training


def make_params(seed: int, device: str = "cpu") -> dict:
    ks = random.split(random.key(seed), 8)
    n = lambda i, shape: (random.normal(ks[i], shape) * 0.5).to(device).requires_grad_(True)  # noqa: E731
    return {
        "embed": {"weight": n(0, (5, 4))},
        "blocks": [{"w": n(1 + 2 * i, (4, 4)), "b": n(2 + 2 * i, (4,))} for i in range(2)],
        "head": {"weight": n(5, (3, 4)), "bias": n(6, (3,))},
        "scale": n(7, ()),
    }


def loss_fn(p: dict, x: torch.Tensor) -> torch.Tensor:
    h = x @ p["embed"]["weight"]
    for blk in p["blocks"]:
        h = torch.tanh(h @ blk["w"].T + blk["b"])
    return ((h @ p["head"]["weight"].T + p["head"]["bias"]) ** 2).mean() * p["scale"]


def train(p: dict, opt: torch.optim.Optimizer, key: torch.Tensor, start: int, n: int) -> None:
    for step in range(start, start + n):
        x = random.normal(random.fold_in(key, step), (8, 5)).to(p["scale"].device)
        opt.zero_grad()
        loss_fn(p, x).backward()
        opt.step()


def build_opt(p: dict, layout: str, **hyper) -> torch.optim.Optimizer:
    flat = flatten(p)
    if layout == "flat":
        return torch.optim.AdamW(leaves(p), **hyper)
    if layout == "reversed":  # the same optimizer, params listed in another order
        return torch.optim.AdamW(list(flat.values())[::-1], **hyper)
    decay = [v for k, v in flat.items() if v.ndim >= 2]
    no_decay = [v for k, v in flat.items() if v.ndim < 2]
    return torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], **hyper)


def bits(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_trees_bitwise(a: dict, b: dict) -> None:
    fa, fb = flatten(a), flatten(b)
    assert list(fa) == list(fb)
    for k in fa:
        assert fa[k].dtype == fb[k].dtype and fa[k].shape == fb[k].shape, k
        assert bits(fa[k]) == bits(fb[k]), k


def assert_opt_bitwise(o1, p1, o2, p2) -> None:
    (t1, i1), (t2, i2) = optimizer_entries(o1, p1), optimizer_entries(o2, p2)
    assert sorted(t1) == sorted(t2) and i1["param_groups"] == i2["param_groups"]
    for k in t1:
        assert t1[k].dtype == t2[k].dtype and bits(t1[k]) == bits(t2[k]), k


# ---------------------------------------------------------------- round trip and bitwise resume


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("layout,device", [("flat", "cpu"), ("reversed", "cpu"), ("groups", "cpu"),
                                           pytest.param("flat", "cuda", marks=CUDA)])
def test_resume_continues_bitwise(tmp_path, layout, device):
    hyper = dict(lr=3e-2, betas=(0.8, 0.95), weight_decay=0.1)
    key, cfg = random.key(7), {"lr": 3e-2, "layers": 2}
    ref = make_params(0, device)
    opt = build_opt(ref, layout, **hyper)
    train(ref, opt, key, 0, 3)
    run = RunDir(tmp_path / "run")
    run.save(3, ref, opt, extra=dict(config=cfg, rng_key=key, data_state={"step": 3}))
    train(ref, opt, key, 3, 3)  # the uninterrupted run

    p = make_params(99, device)  # a fresh process: other values, default hyperparameters
    opt2 = build_opt(p, layout)
    ck = run.load(like=p, optimizer=opt2)
    assert ck.step == 3 and ck.params is p and ck.extra["config"] == cfg
    assert opt2.param_groups[0]["lr"] == 3e-2 and opt2.param_groups[0]["betas"] == (0.8, 0.95)
    train(p, opt2, ck.extra["rng_key"], ck.extra["data_state"]["step"], 3)
    assert_trees_bitwise(p, ref)
    assert_opt_bitwise(opt2, p, opt, ref)
    assert load_checkpoint(run.file(3), device=device).params["scale"].device.type == device


def test_file_round_trip_without_like_rebuilds_lists_and_extras(tmp_path):
    p = make_params(1)
    path = tmp_path / "a.safetensors"
    extra = {"config": {"name": "tiny", "dims": (4, 4)}, "rng_key": random.key(3), "data_state": [1, None, 2.5]}
    save_checkpoint(path, p, extra=extra, step=12)
    ck = load_checkpoint(path)
    assert ck.step == 12 and isinstance(ck.params["blocks"], list)
    assert_trees_bitwise(ck.params, p)
    assert ck.extra["config"] == {"name": "tiny", "dims": (4, 4)} and ck.extra["data_state"] == [1, None, 2.5]
    assert torch.equal(ck.extra["rng_key"], random.key(3)) and ck.extra["rng_key"].dtype == torch.int64
    # like= casts to its dtype and keeps requires_grad; the params load with any safetensors reader
    like = {k: v.detach().double() for k, v in flatten(p).items()}
    out = load_checkpoint(path, like=unflatten(like)).params
    assert out["head"]["bias"].dtype == torch.float64 and not out["head"]["bias"].requires_grad
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(path))["blocks.1.w"], p["blocks"][1]["w"].detach())


def test_state_is_a_tree_of_its_own_beside_the_params(tmp_path):
    p = make_params(1)
    opt = torch.optim.AdamW(leaves(p))
    state = {"bn": {"running_mean": torch.arange(4.0), "num_batches_tracked": torch.tensor(3)}}
    path = tmp_path / "s.safetensors"
    save_checkpoint(path, p, opt, state=state, step=2)
    from safetensors.torch import load_file

    raw = load_file(str(path))  # the state sits under its own prefix, outside the params' keys
    assert torch.equal(raw["state.bn.running_mean"], torch.arange(4.0)) and "bn.running_mean" not in raw
    ck = load_checkpoint(path, like=p, optimizer=torch.optim.AdamW(leaves(p)),
                         state_like={"bn": {"running_mean": torch.zeros(4, dtype=torch.float64),
                                            "num_batches_tracked": torch.tensor(0)}})
    assert sorted(flatten(ck.params)) == sorted(flatten(p))  # no state key leaked into the params
    assert ck.state["bn"]["running_mean"].dtype == torch.float64  # placed like state_like
    assert ck.state["bn"]["running_mean"].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert int(ck.state["bn"]["num_batches_tracked"]) == 3
    assert load_checkpoint(path).state["bn"]["num_batches_tracked"].dtype == torch.int64
    assert load_checkpoint(tmp_path / "s.safetensors").step == 2
    with pytest.raises(CheckpointError, match="bn.running_var"):
        load_checkpoint(path, like=p, state_like={"bn": {"running_mean": torch.zeros(4),
                                                          "num_batches_tracked": torch.tensor(0),
                                                          "running_var": torch.ones(4)}})
    save_checkpoint(tmp_path / "n.safetensors", p)
    assert load_checkpoint(tmp_path / "n.safetensors").state is None  # saved without state
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(tmp_path / "r.safetensors", {"state": {"w": torch.ones(1)}})


def test_mismatched_tree_names_every_key_and_changes_nothing(tmp_path):
    p = make_params(2)
    opt = torch.optim.AdamW(leaves(p))
    train(p, opt, random.key(0), 0, 1)
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, p, opt)
    like = make_params(3)
    del like["head"]["bias"]
    like["extra_w"] = torch.zeros(2)
    like["blocks"][0]["w"] = torch.zeros(4, 5)
    before = {k: v.clone() for k, v in flatten(like).items()}
    opt2 = torch.optim.AdamW(leaves(like))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path, like=like, optimizer=opt2)
    msg = str(e.value)
    assert str(path) in msg and "head.bias" in msg and "extra_w" in msg and "blocks.0.w: expected (4, 5), got (4, 4)" in msg
    assert isinstance(e.value, ValueError) and not opt2.state
    assert all(torch.equal(before[k], v) for k, v in flatten(like).items())


def test_optimizer_mismatches_are_named(tmp_path):
    p = make_params(4)
    opt = torch.optim.AdamW(leaves(p))
    train(p, opt, random.key(0), 0, 1)
    path = tmp_path / "o.safetensors"
    save_checkpoint(path, p, opt)
    with pytest.raises(CheckpointError, match="saved from AdamW, cannot load it into SGD"):
        load_checkpoint(path, like=p, optimizer=torch.optim.SGD(leaves(p), lr=0.1))
    with pytest.raises(CheckpointError, match="optimizer has 2 param group\\(s\\), the saved state 1"):
        load_checkpoint(path, like=p, optimizer=build_opt(p, "groups"))
    with pytest.raises(ValueError, match="not a leaf of the params tree"):
        load_checkpoint(path, like=p, optimizer=torch.optim.AdamW(leaves(make_params(4))))
    save_checkpoint(path, p)
    with pytest.raises(CheckpointError, match="saved without optimizer"):
        load_checkpoint(path, like=p, optimizer=torch.optim.AdamW(leaves(p)))


def test_bad_inputs_are_refused_before_writing(tmp_path):
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(tmp_path / "r.safetensors", {"optim": {"w": torch.zeros(1)}})
    with pytest.raises(TypeError, match="JSON values"):
        RunDir(tmp_path / "run").save(1, {"w": torch.zeros(1)}, extra={"config": object()})
    with pytest.raises(ValueError, match="non-negative int"):
        RunDir(tmp_path / "run").save(-1, {"w": torch.zeros(1)})
    assert not (tmp_path / "r.safetensors").exists() and RunDir(tmp_path / "run").steps() == []
    with pytest.raises(FileNotFoundError, match="no checkpoint in run directory"):
        RunDir(tmp_path / "run").load()


# ---------------------------------------------------------------- integrity


def _small_checkpoint(path) -> None:
    p = {"a": torch.arange(6.0).reshape(2, 3).requires_grad_(True), "b": [{"c": torch.tensor([1, 2], dtype=torch.int32)}]}
    opt = torch.optim.AdamW([p["a"]])
    p["a"].grad = torch.ones(2, 3)
    opt.step()
    save_checkpoint(path, p, opt, extra={"rng_key": random.key(1), "config": {"x": 1}}, step=5)


def test_truncated_files_are_rejected(tmp_path):
    path = tmp_path / "t.safetensors"
    _small_checkpoint(path)
    data = path.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    for cut in [0, 5, 8, 9, header_end // 2, header_end - 1, header_end, header_end + 3, len(data) - 1]:
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="truncated") as e:
            load_checkpoint(bad)
        assert str(bad) in str(e.value)
    bad.write_bytes(data + b"\0\0")
    with pytest.raises(CheckpointError, match="unexpected bytes after the tensor data"):
        verify(bad)


def test_every_flipped_bit_is_rejected(tmp_path):
    path = tmp_path / "f.safetensors"
    _small_checkpoint(path)
    data = path.read_bytes()
    load_checkpoint(path)  # the pristine file loads
    accepted = []
    for i in range(len(data)):  # every byte, each bit position in turn
        bad = bytearray(data)
        bad[i] ^= 1 << (i % 8)
        path.write_bytes(bytes(bad))
        try:
            load_checkpoint(path)
            accepted.append(i)
        except CheckpointError as e:
            assert str(path) in str(e)
    assert accepted == []


def test_flipped_payload_byte_names_the_tensor(tmp_path):
    path = tmp_path / "g.safetensors"
    _small_checkpoint(path)
    data = bytearray(path.read_bytes())
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    start = 8 + int.from_bytes(data[:8], "little") + header["optim.state.a.exp_avg_sq"]["data_offsets"][0]
    data[start + 1] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"sha256 mismatch in 1 tensor\(s\): optim.state.a.exp_avg_sq"):
        load_checkpoint(path)


def test_plain_safetensors_file_is_not_mistaken_for_a_checkpoint(tmp_path):
    from polymodal.core import pytree

    pytree.save(tmp_path / "plain.safetensors", {"w": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="not a polymodal checkpoint"):
        load_checkpoint(tmp_path / "plain.safetensors")


# ---------------------------------------------------------------- run directory: pointer, pruning, crashes


def test_keep_last_n_and_latest_json(tmp_path):
    run = RunDir(tmp_path / "run", keep=2)
    p = {"w": torch.zeros(3)}
    for s in range(1, 6):
        run.save(s * 10, p, extra={"config": {"s": s}, "rng_key": random.key(s)})
    assert run.steps() == [40, 50]
    d = json.loads((tmp_path / "run" / "latest.json").read_text())
    assert d["step"] == 50 and d["file"] == "ckpt-00000050.safetensors" and d["extra"]["config"] == {"s": 5}
    info = run.latest()
    assert info.step == 50 and torch.equal(info.extra["rng_key"], random.key(5))
    run.save(45, p)  # resumed from an earlier point: newer files stay, latest follows the save
    assert run.steps() == [40, 45, 50] and run.latest().step == 45
    all_kept = RunDir(tmp_path / "all", keep=None)
    for s in range(4):
        all_kept.save(s, p)
    assert all_kept.steps() == [0, 1, 2, 3] and all_kept.load(step=1, like=p).step == 1


def test_writer_crash_halfway_keeps_previous_checkpoint(tmp_path, monkeypatch):
    run = RunDir(tmp_path / "run")
    run.save(1, {"w": torch.full((4,), 1.0)}, extra={"k": 1})
    real = ckfile._save_file

    def half_then_fail(tensors, path, metadata):
        real(tensors, path, metadata)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        raise OSError("No space left on device")

    monkeypatch.setattr(ckfile, "_save_file", half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        run.save(2, {"w": torch.full((4,), 2.0)}, extra={"k": 2})
    assert run.latest().step == 1  # no partial file and no temp file are left behind
    assert sorted(os.listdir(tmp_path / "run")) == ["ckpt-00000001.safetensors", "latest.json"]
    ck = run.load(like={"w": torch.zeros(4)})
    assert ck.step == 1 and ck.params["w"].tolist() == [1.0] * 4 and ck.extra == {"k": 1}


def test_crash_before_pointer_update_keeps_latest(tmp_path, monkeypatch):
    run = RunDir(tmp_path / "run")
    run.save(1, {"w": torch.full((2,), 1.0)})

    def fail(path, text):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckrun, "_write_pointer", fail)
    with pytest.raises(KeyboardInterrupt):
        run.save(2, {"w": torch.full((2,), 2.0)})
    assert run.latest().step == 1 and run.load().params["w"].tolist() == [1.0, 1.0]
    monkeypatch.undo()
    run.save(3, {"w": torch.full((2,), 3.0)})
    assert run.latest().step == 3 and run.load(step=2).params["w"].tolist() == [2.0, 2.0]


_KILL_SCRIPT = """
import sys, torch
from polymodal.train.checkpoint import RunDir
run = RunDir(sys.argv[1], keep=2)
info = run.latest()
step = info.step + 1 if info else 1
big = torch.empty(4_000_000)
while True:
    big.fill_(float(step))
    run.save(step, {"big": big, "small": torch.full((3,), float(step))}, extra={"step": step})
    step += 1
"""


def _wait(cond, timeout: float, proc) -> None:
    t0 = time.monotonic()
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"writer exited early: {proc.stderr.read().decode()}")
        if time.monotonic() - t0 > timeout:
            raise AssertionError("timed out waiting for the writer")
        time.sleep(0.002)


def test_sigkill_mid_write_leaves_latest_loadable(tmp_path):
    d = tmp_path / "run"
    run = RunDir(d, keep=2)
    like = {"big": torch.zeros(4_000_000), "small": torch.zeros(3)}
    env = {**os.environ, "PYTHONPATH": REPO}
    last = 0
    for rnd in range(2):
        proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(d)], env=env, stderr=subprocess.PIPE)
        try:
            _wait(lambda: run.latest() is not None and run.latest().step > last, 120, proc)

            def writing() -> bool:  # a temp data file with bytes in it: the kill lands mid-write
                for n in os.listdir(d):
                    if n.startswith(".tmp-") and n.endswith(".safetensors"):
                        try:
                            if os.path.getsize(d / n) > 0:
                                return True
                        except FileNotFoundError:  # renamed into place since listdir
                            pass
                return False

            _wait(writing, 60, proc)
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        assert proc.returncode == -signal.SIGKILL
        info = run.latest()
        assert info.step > last
        ck = run.load(like=like)
        assert ck.step == info.step == ck.extra["step"]
        assert bool((ck.params["big"] == float(info.step)).all()) and ck.params["small"].tolist() == [info.step] * 3
        for s in run.steps():
            verify(run.file(s))
        last = info.step
    run.save(last + 1, like)  # a later save cleans the killed writer's temp files
    assert not [n for n in os.listdir(d) if n.startswith(".tmp-")]


# ---------------------------------------------------------------- hypothesis: trees of any shape and dtype

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8, torch.bool]
names = st.text(alphabet="abcxyz_", min_size=1, max_size=4)
leaf = st.tuples(st.lists(st.integers(0, 3), max_size=3), st.sampled_from(DTYPES))
trees = st.recursive(
    st.dictionaries(names, leaf, min_size=1, max_size=3),
    lambda sub: st.dictionaries(names, st.one_of(leaf, sub, st.lists(sub, min_size=1, max_size=2)), min_size=1, max_size=3),
    max_leaves=8,
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**62), 2**62) | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda sub: st.lists(sub, max_size=3) | st.dictionaries(st.text(max_size=4), sub, max_size=3)
    | st.tuples(sub, sub),
    max_leaves=6,
)


def materialize(spec, gen: torch.Generator):
    if isinstance(spec, dict):
        return {k: materialize(v, gen) for k, v in spec.items()}
    if isinstance(spec, list):
        return [materialize(v, gen) for v in spec]
    shape, dtype = spec
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    if dtype.is_floating_point:
        x = torch.randn(shape, generator=gen, dtype=torch.float64) * 100
        return x.to(dtype)
    return torch.randint(0, 200, shape, generator=gen).to(dtype)


@settings(max_examples=25, deadline=None)
@given(spec=trees, seed=st.integers(0, 2**31), extra=st.dictionaries(st.text(max_size=4), json_values, max_size=3))
def test_round_trip_any_tree(tmp_path_factory, spec, seed, extra):
    tree = materialize(spec, torch.Generator().manual_seed(seed))
    path = tmp_path_factory.mktemp("h") / "x.safetensors"
    extra = {**extra, "rng": random.key(seed)}
    save_checkpoint(path, tree, extra=extra)
    for ck in (load_checkpoint(path), load_checkpoint(path, like=tree)):
        assert_trees_bitwise(ck.params, unflatten(flatten(tree)))
        assert ck.extra.keys() == extra.keys() and torch.equal(ck.extra.pop("rng"), extra["rng"])
        assert ck.extra == {k: v for k, v in extra.items() if k != "rng"}


float_leaf = st.tuples(st.lists(st.integers(1, 3), max_size=3), st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))


@settings(max_examples=10, deadline=None)
@given(spec=st.dictionaries(names, st.one_of(float_leaf, st.lists(st.dictionaries(names, float_leaf, min_size=1, max_size=2), min_size=1, max_size=2)), min_size=1, max_size=3),
       seed=st.integers(0, 2**31))
def test_adamw_state_round_trip_any_tree(tmp_path_factory, spec, seed):
    gen = torch.Generator().manual_seed(seed)
    p = materialize(spec, gen)
    for t in leaves(p):
        t.requires_grad_(True)
    opt = torch.optim.AdamW(leaves(p), lr=0.01)
    for _ in range(2):
        for t in leaves(p):
            t.grad = torch.randn(t.shape, generator=gen).to(t.dtype)
        opt.step()
    path = tmp_path_factory.mktemp("a") / "o.safetensors"
    save_checkpoint(path, p, opt)
    q = materialize(spec, torch.Generator().manual_seed(seed + 1))
    opt2 = torch.optim.AdamW(leaves(q))
    load_checkpoint(path, like=q, optimizer=opt2)
    assert_trees_bitwise(q, p)
    assert_opt_bitwise(opt2, q, opt, p)


# ---------------------------------------------------------------- sharded checkpoints (DCP)


def test_sharded_single_process_resume_and_consolidate(tmp_path):
    key = random.key(5)
    ref = make_params(10)
    opt = torch.optim.AdamW(leaves(ref), lr=1e-2)
    train(ref, opt, key, 0, 2)
    d = str(tmp_path / "dcp")
    save_sharded(d, ref, opt, extra={"rng_key": key}, step=2)
    save_sharded(d, ref, opt, extra={"rng_key": key}, step=2)  # overwriting swaps the directory in whole
    assert sorted(os.listdir(tmp_path)) == ["dcp"]
    p = make_params(11)
    opt2 = torch.optim.AdamW(leaves(p))
    ck = load_sharded(d, like=p, optimizer=opt2)
    assert ck.step == 2 and ck.params is p
    consolidate(d, tmp_path / "one.safetensors")
    q = make_params(12)
    opt3 = torch.optim.AdamW(leaves(q))
    one = load_checkpoint(tmp_path / "one.safetensors", like=q, optimizer=opt3)
    assert one.step == 2 and torch.equal(one.extra["rng_key"], key)
    assert_trees_bitwise(q, ref)
    assert_opt_bitwise(opt3, q, opt, ref)
    train(ref, opt, key, 2, 2)
    train(p, opt2, ck.extra["rng_key"], 2, 2)
    assert_trees_bitwise(p, ref)
    assert_opt_bitwise(opt2, p, opt, ref)


def test_sharded_errors_and_crash_recovery(tmp_path):
    d = str(tmp_path / "dcp")
    p = {"w": torch.arange(4.0), "b": torch.ones(2)}
    save_sharded(d, p)
    with pytest.raises(CheckpointError, match=r"(?s)missing keys \(1\): v.*unexpected keys \(1\): b"):
        load_sharded(d, like={"w": torch.zeros(4), "v": torch.zeros(2)})
    os.replace(d, d + ".old")  # a crash between moving the old checkpoint aside and renaming the new one
    assert load_sharded(d, like=p).params["w"].tolist() == [0.0, 1.0, 2.0, 3.0]
    os.makedirs(d)
    os.replace(os.path.join(d + ".old", ".metadata"), os.path.join(d, "x"))
    with pytest.raises(CheckpointError, match="no .metadata"):
        load_sharded(d, like=p)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_worker(rank: int, world: int, port: int, d: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from polymodal.core import pytree

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        mesh = init_device_mesh("cpu", (world,))
        full = make_params(20)
        shard = lambda t: distribute_tensor(t.detach(), mesh, [Shard(0)] if t.ndim else [Replicate()]).requires_grad_(True)  # noqa: E731
        p = pytree.tree_map(shard, full)
        opt = torch.optim.AdamW(leaves(p), lr=1e-2)
        for step in range(2):
            for t in leaves(p):  # a gradient that depends on the param, same on every layout
                t.grad = (t.detach() * 0.5 + float(step)).requires_grad_(False)
            opt.step()
        save_sharded(os.path.join(d, "dcp"), p, opt, extra={"world": world}, step=2)
        # reshard on load, in the same world: everything replicated this time
        q = pytree.tree_map(lambda t: distribute_tensor(torch.zeros_like(t.detach()), mesh, [Replicate()]), full)
        back = load_sharded(os.path.join(d, "dcp"), like=q).params
        gathered = pytree.tree_map(lambda t: t.full_tensor(), p)  # collectives: every rank takes part
        state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in optimizer_entries(opt, p)[0].items()}
        assert_trees_bitwise(pytree.tree_map(lambda t: t.full_tensor(), back), gathered)
        if rank == 0:
            save_checkpoint(os.path.join(d, "reference.safetensors"), gathered, extra={"state": state})
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_dcp_two_ranks_load_in_one_process_and_consolidate(tmp_path):
    import torch.multiprocessing as mp

    d = str(tmp_path)
    mp.spawn(_dist_worker, args=(2, _free_port(), d), nprocs=2, join=True)
    ref = load_checkpoint(os.path.join(d, "reference.safetensors"))
    like = make_params(21)
    opt = torch.optim.AdamW(leaves(like))
    ck = load_sharded(os.path.join(d, "dcp"), like=like, optimizer=opt)  # world size 1, plain tensors
    assert ck.step == 2 and ck.extra == {"world": 2}
    assert_trees_bitwise(ck.params, ref.params)
    got = optimizer_entries(opt, like)[0]
    assert sorted(got) == sorted(ref.extra["state"])
    for k, v in ref.extra["state"].items():
        assert bits(got[k]) == bits(v), k
    consolidate(os.path.join(d, "dcp"), os.path.join(d, "one.safetensors"))
    one = load_checkpoint(os.path.join(d, "one.safetensors"), like=make_params(22))
    assert one.step == 2
    assert_trees_bitwise(one.params, ref.params)
