"""The block seam: policies in a ContextVar (per thread), honoured under torch.compile, recorded stacks."""

from __future__ import annotations

import threading

import pytest
import torch

from polymodal.core.layers.seam import current_policy, default_policy, record_stacks, run_layers, use_policy

BLOCKS = [{"w": torch.tensor(2.0)}, {"w": torch.tensor(3.0)}]


def _stack(x):
    return run_layers(lambda i, p, h, k, e: (h * p["w"], None), BLOCKS, x)[0]


def _counting(calls):
    def policy(call, i, p, x, key, extra):
        calls.append(i)
        return call(p, x, key, extra)

    return policy


def _scaling(k):
    def policy(call, i, p, x, key, extra):
        y, aux = call(p, x, key, extra)
        return y * k, aux

    return policy


def test_policies_nest_and_restore():
    a, b = _scaling(2.0), _scaling(5.0)
    assert current_policy() is default_policy
    with use_policy(a):
        with use_policy(b):
            assert current_policy() is b
            assert float(_stack(torch.ones(()))) == 6.0 * 25.0  # each block scaled by 5
        assert current_policy() is a
    assert current_policy() is default_policy
    with pytest.raises(TypeError, match="expected a callable policy"):
        with use_policy("checkpoint"):
            pass


def test_policy_is_per_thread():
    seen = {}
    entered, release = threading.Event(), threading.Event()

    def other():
        seen["start"] = current_policy()
        with use_policy(_scaling(7.0)):
            entered.set()
            release.wait(10)
            seen["inside"] = float(_stack(torch.ones(())))

    t = threading.Thread(target=other)
    t.start()
    entered.wait(10)
    try:
        # the other thread's policy is installed right now, and does not reach this one
        assert current_policy() is default_policy
        assert float(_stack(torch.ones(()))) == 6.0
    finally:
        release.set()
        t.join(10)
    assert seen == {"start": default_policy, "inside": 6.0 * 49.0}


def test_compiled_function_honours_a_policy_installed_after_tracing():
    import torch._dynamo.testing

    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    f = torch.compile(_stack, backend=counter, fullgraph=True)
    x = torch.ones(2)
    torch.testing.assert_close(f(x), torch.full((2,), 6.0))  # traced under the default policy
    assert counter.frame_count == 1
    calls = []
    with use_policy(_counting(calls)):
        y = f(x)
    # dynamo guards on the ContextVar's value: the new policy recompiles and is honoured
    torch.testing.assert_close(y, torch.full((2,), 6.0))
    assert calls == [0, 1]
    assert counter.frame_count == 2
    with use_policy(_scaling(10.0)):
        torch.testing.assert_close(f(x), torch.full((2,), 600.0))
    torch.testing.assert_close(f(x), torch.full((2,), 6.0))  # back to the default: the first graph again
    assert counter.frame_count == 3


def test_record_stacks_finds_the_lists_run_by_the_seam():
    params = {"a": {"layers": [{"w": torch.tensor(2.0)}, {"w": torch.tensor(3.0)}]},
              "merges": [{"lin": {"w": torch.tensor(4.0)}}],  # composite blocks, but not run by the seam
              "b": [[{"w": torch.tensor(5.0)}], [{"w": torch.tensor(6.0)}]]}

    def model(p, x):
        f = lambda i, q, h, k, e: (h * q["w"], None)  # noqa: E731
        x = run_layers(f, p["a"]["layers"][1:], x)[0]  # a slice: found by its leaves
        x = x * p["merges"][0]["lin"]["w"]
        for stage in p["b"]:
            x = run_layers(f, stage, x)[0]
        return x

    assert record_stacks(model, params, torch.ones(())) == ["a.layers", "b.0", "b.1"]
    assert current_policy() is default_policy
