"""The CUDA paths: per-sample gradients through SDPA's CUDA kernels (the batching rules registered
for the flash / memory-efficient backward), CLIP's per-sample gradients, and inductor on CUDA.

Skipped without a GPU (CI has none); run on a lent GPU with ``pytest tests/test_cuda.py``."""

import warnings

import pytest
import torch
from torch.func import grad, vmap

from polymodal.core import pytree
from polymodal.core import random as pr
from polymodal.core.layers import sdpa
from polymodal.core.layers.attention_kernel import math_sdpa
from polymodal.core.pytree import tree_map
from polymodal.models.clip import CLIP, build, clip_text_transformer, clip_vision_transformer
from polymodal.train.dp.per_sample import per_sample_grads

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
CUDA = torch.device("cuda")


def normal(seed, *shape, dtype=torch.float32):
    return pr.normal(pr.key(seed), shape).to(CUDA, dtype)


def kernel_calls(fn) -> dict[str, int]:
    """How often each attention kernel ran (profiler op names containing "attention")."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
        torch.cuda.synchronize()
    calls: dict[str, int] = {}
    for e in prof.events():
        if "attention" in e.name and e.name.startswith("aten::_"):
            calls[e.name] = calls.get(e.name, 0) + 1
    return calls


@pytest.mark.parametrize("dtype,causal", [(torch.float32, False), (torch.float32, True),
                                          (torch.bfloat16, False), (torch.bfloat16, True)])
def test_vmap_grad_of_sdpa_on_cuda_kernels_equals_loop(dtype, causal):
    n, b, h, t, d = 4, 2, 4, 16, 32
    q, k, v = (normal(s, n, b, h, t, d, dtype=dtype) for s in (0, 1, 2))
    w = normal(3, b, h, t, d, dtype=dtype)

    def loss(q, k, v, f):
        return (f(q, k, v, causal).float() * w.float()).sum()

    fast = lambda q, k, v, c: sdpa(q, k, v, is_causal=c)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a per-example fallback warns ("There is a performance drop ...")
        got = vmap(grad(loss, argnums=(0, 1, 2)), in_dims=(0, 0, 0, None))(q, k, v, fast)
    calls = kernel_calls(lambda: vmap(grad(loss, argnums=(0, 1, 2)), in_dims=(0, 0, 0, None))(q, k, v, fast))
    backward = {name: c for name, c in calls.items() if name.endswith("backward")}
    assert backward and all(c <= 2 for c in backward.values()), calls  # one call on the folded batch, not n

    def ref(q, k, v, c):  # the math formula in float64
        mask = torch.ones(t, t, dtype=torch.bool, device=CUDA).tril() if c else None
        m = None if mask is None else torch.where(mask, 0.0, float("-inf")).double()
        return math_sdpa(q.double(), k.double(), v.double(), m)

    tol = dict(rtol=1e-3, atol=1e-3) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    for i in range(n):
        looped = grad(loss, argnums=(0, 1, 2))(q[i], k[i], v[i], fast)  # the same kernel, one example
        want = grad(loss, argnums=(0, 1, 2))(q[i], k[i], v[i], ref)
        for j in range(3):
            where = f"example {i}, input {j}"
            torch.testing.assert_close(got[j][i], looped[j], **tol, msg=lambda m, w=where: f"{w}, vmap vs loop: {m}")
            torch.testing.assert_close(got[j][i].double(), want[j].double(), **tol,
                                       msg=lambda m, w=where: f"{w}, vs fp64: {m}")


def test_clip_per_sample_gradients_on_cuda_equal_a_loop():
    spec = CLIP(visual=clip_vision_transformer(image_size=16, patch_size=4, width=32, layers=2, heads=2, embed_dim=24),
                text=clip_text_transformer(context_length=8, vocab_size=60, width=32, heads=2, layers=2, embed_dim=24))
    params = tree_map(lambda x: x.to(CUDA), spec.init(key=pr.key(0)))
    b = 3
    x = normal(1, b, 3, 16, 16)
    ids = pr.randint(pr.key(2), (b, 8), 1, 59).scatter(1, torch.tensor([[3], [7], [5]]), 59).to(CUDA)

    def loss(p, batch):  # per-example: each image's similarity to its own caption
        img = spec.encode_image(p, batch["x"])
        txt = spec.encode_text(p, batch["t"])
        return -(img * txt).sum(-1) * p["logit_scale"].exp()

    g = per_sample_grads(loss, params, {"x": x, "t": ids})
    for i in range(b):
        gi = grad(lambda p: loss(p, {"x": x[i:i + 1], "t": ids[i:i + 1]}).sum())(params)
        flat_g, flat_i = pytree.flatten(g), pytree.flatten(gi)
        for name, v in flat_g.items():
            torch.testing.assert_close(v[i], flat_i[name], rtol=1e-3, atol=1e-5, msg=name)


def test_inductor_on_cuda_matches_eager():
    spec = build("clip_tiny")
    p = tree_map(lambda x: x.to(CUDA), spec.init(key=pr.key(0)))
    x = normal(1, 2, 3, 64, 64)
    t = pr.randint(pr.key(2), (2, 32), 1, 49406).scatter(1, torch.tensor([[5], [31]]), 49407).to(CUDA)
    torch._dynamo.reset()
    img = torch.compile(spec.encode_image, fullgraph=True)
    txt = torch.compile(spec.encode_text, fullgraph=True)
    torch.testing.assert_close(img(p, x), spec.encode_image(p, x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(txt(p, t), spec.encode_text(p, t), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("preset,precision", [("tiny", "bf16"), ("tiny-vit", "fp16")])
def test_cli_trains_on_the_gpu_and_resumes(tmp_path, preset, precision):
    import json

    from polymodal.cli import main
    from polymodal.train.loop import load_run
    from polymodal.train.metrics import read_metrics

    torch.backends.cudnn.deterministic = True
    common = ["train", "clip", "--preset", preset, "--batch-size", "16", "--train-size", "64", "--eval-size", "16",
              "--warmup", "1", "--eval-every", "0", "--save-every", "2", "--precision", precision, "--no-progress",
              "--steps", "4"]
    a, b = tmp_path / "a", tmp_path / "b"
    torch.cuda.reset_peak_memory_stats()
    assert main([*common, "--out", str(a)]) == 0  # --device auto picks the GPU
    assert json.loads((a / "config.json").read_text())["resolved_device"].startswith("cuda")
    assert torch.cuda.max_memory_allocated() > 0
    assert main([*common, "--device", "cuda", "--stop-after", "3", "--out", str(b)]) == 0
    assert main([*common, "--device", "cuda", "--out", str(b), "--resume"]) == 0
    la = [r["loss"] for r in read_metrics(a) if "loss" in r]
    lb = [r["loss"] for r in read_metrics(b) if "loss" in r]
    assert len(la) == len(lb) == 4
    torch.testing.assert_close(torch.tensor(lb), torch.tensor(la), rtol=1e-4, atol=1e-5)
    ra, rb = load_run(a), load_run(b)
    for k, v in pytree.flatten(ra.params).items():
        torch.testing.assert_close(pytree.flatten(rb.params)[k], v, rtol=1e-3, atol=1e-4)
