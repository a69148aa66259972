import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from polymodal.core import pytree

names = st.text("abcdefgh_", min_size=1, max_size=5)


@st.composite
def trees(draw, depth=0):
    if depth >= 2 or draw(st.booleans()):
        if draw(st.booleans()) and depth > 0:
            n = draw(st.integers(1, 3))
            return [draw(trees(depth + 1)) for _ in range(n)]
        shape = tuple(draw(st.lists(st.integers(1, 3), max_size=3)))
        dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.int64]))
        return torch.arange(int(np.prod(shape)) if shape else 1).reshape(shape).to(dtype)
    keys = draw(st.lists(names, min_size=1, max_size=3, unique=True))
    return {k: draw(trees(depth + 1)) for k in keys}


def as_dict(t):
    return t if isinstance(t, dict) else {"root": t}


@given(trees())
def test_flatten_unflatten_roundtrip(tree):
    tree = as_dict(tree)
    flat = pytree.flatten(tree)
    back = pytree.unflatten(flat)
    assert pytree.flatten(back).keys() == flat.keys()
    for k in flat:
        assert back is not None and torch.equal(pytree.flatten(back)[k], flat[k])


def test_flatten_matches_state_dict():
    m = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Sequential(torch.nn.LayerNorm(3)))
    tree = {"0": {"weight": m[0].weight, "bias": m[0].bias}, "2": {"0": {"weight": m[2][0].weight, "bias": m[2][0].bias}}}
    assert list(pytree.flatten(tree)) == list(m.state_dict())
    lst = {"blocks": [{"w": torch.ones(1)}, {"w": torch.zeros(1)}]}
    assert list(pytree.flatten(lst)) == ["blocks.0.w", "blocks.1.w"]
    assert isinstance(pytree.unflatten(pytree.flatten(lst))["blocks"], list)


def test_tree_map_several_trees_and_errors():
    a = {"x": torch.ones(2), "y": [torch.ones(1)]}
    b = {"x": torch.full((2,), 2.0), "y": [torch.full((1,), 3.0)]}
    c = pytree.tree_map(lambda u, v: u + v, a, b)
    assert torch.equal(c["x"], torch.full((2,), 3.0)) and torch.equal(c["y"][0], torch.full((1,), 4.0))
    with pytest.raises(ValueError, match="structures differ"):
        pytree.tree_map(lambda u, v: u, a, {"x": torch.ones(2)})


def test_counts_and_cast():
    t = {"a": torch.ones(2, 3), "b": [torch.ones(4, dtype=torch.float64)], "i": torch.ones(2, dtype=torch.int64)}
    assert pytree.num_params(t) == 12
    assert pytree.num_bytes(t) == 6 * 4 + 4 * 8 + 2 * 8
    c = pytree.cast(t, torch.bfloat16)
    assert c["a"].dtype == torch.bfloat16 and c["b"][0].dtype == torch.bfloat16 and c["i"].dtype == torch.int64


@given(tree=trees())
def test_save_load_roundtrip_exact(tree, tmp_path_factory):
    tree = as_dict(tree)
    path = tmp_path_factory.mktemp("ck") / "p.safetensors"
    pytree.save(path, tree)
    back = pytree.load(path, like=tree)
    for k, v in pytree.flatten(tree).items():
        got = pytree.flatten(back)[k]
        assert got.dtype == v.dtype and torch.equal(got, v)


def test_load_names_every_bad_key(tmp_path):
    path = tmp_path / "p.safetensors"
    pytree.save(path, {"a": torch.ones(2), "b": torch.ones(3), "extra": torch.ones(1)})
    like = {"a": torch.ones(2), "b": torch.ones(4), "missing": {"w": torch.ones(1)}}
    with pytest.raises(ValueError) as e:
        pytree.load(path, like=like)
    msg = str(e.value)
    assert "missing.w" in msg and "extra" in msg and "b: expected (4,), got (3,)" in msg


def test_load_rejects_truncated_file(tmp_path):
    path = tmp_path / "p.safetensors"
    pytree.save(path, {"a": torch.ones(100)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors"):
        pytree.load(path)
    with pytest.raises(FileNotFoundError):
        pytree.load(tmp_path / "nope.safetensors")


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "p.safetensors"
    pytree.save(path, {"a": torch.ones(2)})
    import safetensors.torch as st_torch

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(st_torch, "save_file", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        pytree.save(path, {"a": torch.zeros(2)})
    assert torch.equal(pytree.load(path)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["p.safetensors"]


def test_numpy_shares_memory():
    t = {"a": torch.arange(4.0)}
    n = pytree.to_numpy(t)
    n["a"][0] = 7.0
    assert t["a"][0] == 7.0
    back = pytree.from_numpy(n)
    assert back["a"].data_ptr() == t["a"].data_ptr()


def test_jax_roundtrip_through_dlpack():
    jax = pytest.importorskip("jax")
    t = {"a": torch.arange(6.0).reshape(2, 3), "b": [torch.ones(2, dtype=torch.float64)]}
    with jax.enable_x64(False):
        with pytest.raises(TypeError, match="b.0"):
            pytree.to_jax(t)
    with jax.enable_x64(True):  # scoped: a global switch would leak into the other tests of this worker
        j = pytree.to_jax(t)
        assert isinstance(j["a"], jax.Array) and j["a"].shape == (2, 3)
        np.testing.assert_array_equal(np.asarray(j["a"]), t["a"].numpy())
        back = pytree.from_jax(j)
        assert torch.equal(back["a"], t["a"]) and back["b"][0].dtype == torch.float64


def test_jax_shares_memory_unless_copy():
    """The documented default shares memory both ways; copy=True gives independent leaves."""
    pytest.importorskip("jax")
    t = {"a": torch.zeros(3)}
    shared, own = pytree.to_jax(t), pytree.to_jax(t, copy=True)
    t["a"].add_(1.0)  # an in-place torch update, as an optimizer step does
    np.testing.assert_array_equal(np.asarray(shared["a"]), [1.0, 1.0, 1.0])
    np.testing.assert_array_equal(np.asarray(own["a"]), [0.0, 0.0, 0.0])
    j = pytree.to_jax({"a": torch.arange(3.0)}, copy=True)
    back_shared, back_own = pytree.from_jax(j), pytree.from_jax(j, copy=True)
    back_own["a"].mul_(10.0)
    np.testing.assert_array_equal(np.asarray(j["a"]), [0.0, 1.0, 2.0])
    assert back_shared["a"].tolist() == [0.0, 1.0, 2.0]
    back_shared["a"].mul_(2.0)  # the documented hazard of the default: the JAX array changes too
    np.testing.assert_array_equal(np.asarray(j["a"]), [0.0, 2.0, 4.0])
