"""Two gloo CPU ranks, each with half the batch: the queues receive every rank's momentum features in rank
order, so the state after the step equals one process's step on the whole batch."""

from __future__ import annotations

import datetime
import os
import socket
import tempfile

import pytest
import torch

from polymodal.core import pytree
from polymodal.core import random as pr
from polymodal.models.albef.builders import albef_tiny

W, B = 2, 2
SPEC = albef_tiny(queue_size=8, vision_layers=1, text_layers=1, multimodal_layers=1, mlm=False)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data():
    images = pr.normal(pr.key(3), (W * B, 3, 32, 32))
    ids = pr.randint(pr.key(4), (W * B, 6), 5, 60)
    ids[:, 0] = 2
    return images, ids, torch.ones_like(ids), torch.arange(W * B) + 10


def _worker(rank, port, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=W,
                            timeout=datetime.timedelta(seconds=60))
    try:
        params = SPEC.init(key=pr.key(0))
        state = SPEC.initial_state(params, key=pr.key(1))
        images, ids, mask, idx = (t[rank * B:(rank + 1) * B] for t in _data())
        _, new = SPEC(params, images, ids, mask, idx, state, key=pr.key(2))
        torch.save(pytree.flatten(new), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.slow  # two spawned ranks import polymodal again: over this family's 60 s test budget on a shared CPU
def test_two_ranks_enqueue_the_gathered_global_batch():
    with tempfile.TemporaryDirectory() as d:
        torch.multiprocessing.spawn(_worker, args=(_free_port(), d), nprocs=W, join=True)
        ranks = [torch.load(os.path.join(d, f"rank{r}.pt")) for r in range(W)]
    params = SPEC.init(key=pr.key(0))
    state = SPEC.initial_state(params, key=pr.key(1))
    _, whole = SPEC(params, *_data(), state, key=pr.key(2))
    whole = pytree.flatten(whole)
    for got in ranks:
        assert got["queue_ptr"].tolist() == [W * B]
        assert got["idx_queue"][0, :W * B].tolist() == list(range(10, 10 + W * B))
        for k in ("image_queue", "text_queue", "momentum.text_proj.weight"):
            torch.testing.assert_close(got[k], whole[k], atol=1e-5, rtol=1e-5)
