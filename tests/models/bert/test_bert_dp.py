"""Per-sample gradients of a BERT classifier (vmap and trace) equal a loop over examples; ghost norms
cover the word, position and token-type embeddings; the norm-only DP step trains it."""

import pytest
import torch
import torch.nn.functional as F

from polymodal.core import random as pr
from polymodal.core.pytree import flatten
from polymodal.models.bert import bert_classifier, bert_tiny
from polymodal.train.dp import DPSGD
from polymodal.train.dp.ghost import ghost_clip
from polymodal.train.dp.per_sample import per_sample_grad_norms, per_sample_grads

SPEC = bert_classifier(bert_tiny(), num_labels=3)


def _batch(n=5, t=6):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 64, (n, t), generator=g)
    ids[:, 0] = 2
    lengths = torch.tensor([6, 3, 5, 2, 6][:n])
    mask = (torch.arange(t) < lengths[:, None]).long()
    types = (torch.arange(t) >= 2).long().expand(n, t) * mask
    return {"ids": ids.masked_fill(mask == 0, 0), "mask": mask, "types": types.contiguous(),
            "labels": torch.randint(0, 3, (n,), generator=g)}


def loss_fn(p, b):
    return F.cross_entropy(SPEC(p, b["ids"], b["mask"], b["types"]), b["labels"], reduction="none")


def _loop(params, batch):
    """Per-example gradients by a plain loop of torch.func.grad over batches of one."""
    n = batch["ids"].shape[0]
    per = [flatten(torch.func.grad(lambda p, i=i: loss_fn(p, {k: v[i:i + 1] for k, v in batch.items()}).sum())(params))
           for i in range(n)]
    return {k: torch.stack([g[k] for g in per]) for k in per[0]}


@pytest.fixture(scope="module")
def setup():
    params = SPEC.init(key=pr.key(0))
    batch = _batch()
    return params, batch, _loop(params, batch)


@pytest.mark.parametrize("method", ["vmap", "trace"])
def test_per_sample_grads_equal_loop(setup, method):
    params, batch, want = setup
    got = flatten(per_sample_grads(loss_fn, params, batch, method=method))
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-4, msg=k)


def test_ghost_norms_cover_the_embeddings(setup):
    params, batch, want = setup
    out = ghost_clip(loss_fn, params, batch, max_grad_norm=None)
    emb = {"bert.embeddings.word_embeddings.weight", "bert.embeddings.position_embeddings.weight",
           "bert.embeddings.token_type_embeddings.weight"}
    assert not emb & set(out.fallback), out.fallback  # the tracer follows all three tables
    norms = torch.stack([w.flatten(1).pow(2).sum(1) for w in want.values()]).sum(0).sqrt()
    torch.testing.assert_close(out.norms, norms, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(per_sample_grad_norms(loss_fn, params, batch, method="vmap"), norms,
                               atol=1e-5, rtol=1e-4)


def test_ghost_norms_without_token_types(setup):
    params, batch, _ = setup
    no_types = lambda p, b: F.cross_entropy(SPEC(p, b["ids"], b["mask"]), b["labels"], reduction="none")  # noqa: E731
    out = ghost_clip(no_types, params, batch, max_grad_norm=None)
    torch.testing.assert_close(out.norms, per_sample_grad_norms(no_types, params, batch, method="vmap"),
                               atol=1e-5, rtol=1e-4)


def test_norm_only_dp_step_trains(setup):
    _, batch, _ = setup
    params = SPEC.init(key=pr.key(0))  # fresh leaves: the step updates them in place
    leaves = [v.requires_grad_() for v in flatten(params).values()]
    opt = torch.optim.SGD(leaves, lr=0.1)
    before = [v.detach().clone() for v in leaves]
    dp = DPSGD(loss_fn, params, opt, max_grad_norm=1.0, noise_multiplier=1.0, sample_rate=0.5, num_samples=10,
               delta=1e-5, key=pr.key(3), method="ghost")
    res = dp.step(batch)
    assert res.epsilon > 0 and torch.isfinite(res.loss)
    assert all(not torch.equal(a, b.detach()) for a, b in zip(before, leaves))
