"""``polymodal train classifier``: fine-tune a CLIP image tower + linear head, optionally with DP-SGD.

Classification is a per-example loss, so DP-SGD's guarantee holds (unlike CLIP's contrastive
loss, see docs/privacy.md). With ``dp=True`` batches are Poisson-sampled, per-example gradients
are clipped (norm-only ghost clipping, exact), Gaussian noise is drawn from the run's key, and
the RDP accountant's epsilon is logged every step. ``init_from`` starts from a CLIP run's image
tower (the usual recipe: pretrain on public data, fine-tune privately).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..core import pytree
from ..core import random as pr
from ..core.layers import Linear
from ..models.clip.task import build_model
from .metrics import MetricsLog, plot_metrics, read_metrics
from .schedule import warmup_cosine

__all__ = ["ClassifyConfig", "train_classifier"]


@dataclass
class ClassifyConfig:
    """A classification fine-tune on the synthetic shapes (label = colour x shape)."""

    preset: str = "tiny-vit"  # CLIP preset whose image tower is fine-tuned (a ViT: no batch statistics)
    init_from: str | None = None  # a 'polymodal train clip' run directory to start from
    steps: int = 100  # optimizer steps
    batch_size: int = 64  # (expected, under DP's Poisson sampling) batch size
    lr: float = 1e-3  # peak learning rate (warmup 10% + cosine)
    out: str = "runs/classifier"  # run directory
    seed: int = 0  # everything random derives from it
    train_size: int = 5_000  # synthetic training images
    eval_size: int = 512  # synthetic eval images
    dp: bool = False  # DP-SGD
    max_grad_norm: float = 1.0  # per-example clipping bound C
    noise_multiplier: float | None = None  # sigma (or give target_epsilon)
    target_epsilon: float | None = None  # pick sigma so that epsilon(steps) stays within it
    delta: float = 1e-5  # delta of the reported (epsilon, delta)
    progress: bool = True  # progress bar


def train_classifier(cfg: ClassifyConfig) -> dict:
    from ..data import SyntheticCaptions
    from .dp import DPSGD
    from .dp.sampling import PoissonBatchSampler
    from .trainer import load_run

    if cfg.dp and (cfg.noise_multiplier is None) == (cfg.target_epsilon is None):
        raise ValueError("--dp needs exactly one of --noise-multiplier or --target-epsilon")
    model = build_model(cfg.preset)
    root = pr.key(cfg.seed)
    if cfg.init_from:
        model, clip_params, saved, bn_state = load_run(cfg.init_from)
        visual = clip_params["visual"]
    else:
        visual, bn_state = model.init(key=pr.fold_in(root, 0))["visual"], model.init_state()
    # A ResNet tower normalises with fixed batch-norm statistics (the CLIP run's, or fresh ones):
    # batch statistics would mix the examples of a batch, which per-example clipping forbids.
    bn_state = None if bn_state is None else bn_state["visual"]
    train = SyntheticCaptions("train", size=cfg.train_size, image_size=model.image_size, seed=cfg.seed + 1,
                              heldout=(), normalize=True)
    evals = SyntheticCaptions("eval", size=cfg.eval_size, image_size=model.image_size, seed=cfg.seed + 1,
                              heldout=(), normalize=True)
    classes = len(train.class_names())
    head = Linear(model.config.embed_dim, classes)
    params = {"visual": visual, "head": head.init(key=pr.fold_in(root, 2))}
    leaves = {k: v.detach().clone().requires_grad_() for k, v in pytree.flatten(params).items()}
    params = pytree.unflatten(leaves)
    opt = torch.optim.AdamW(leaves.values(), lr=cfg.lr, weight_decay=0.0)

    def logits(p, images):
        if bn_state is not None:
            return head(p["head"], model.visual()(p["visual"], images, bn_state)[0])
        return head(p["head"], model.visual()(p["visual"], images))

    def per_example_loss(p, batch):
        return F.cross_entropy(logits(p, batch["images"]), batch["labels"], reduction="none")

    n, q = len(train), cfg.batch_size / len(train)
    dp = None
    if cfg.dp:
        dp = DPSGD(per_example_loss, params, opt, max_grad_norm=cfg.max_grad_norm, sample_rate=q, num_samples=n,
                   delta=cfg.delta, key=pr.fold_in(root, 3), noise_multiplier=cfg.noise_multiplier,
                   target_epsilon=cfg.target_epsilon, steps=cfg.steps)
        sampler = PoissonBatchSampler(n, q, cfg.steps, key=pr.fold_in(root, 4))
        batches = (sampler.batch(s) for s in range(cfg.steps))
    else:
        batches = (pr.randint(pr.fold_in(root, 5 + s), (cfg.batch_size,), 0, n).tolist() for s in range(cfg.steps))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg) | {"task": "classifier"}, indent=2))
    log = MetricsLog(out, truncate_after=0)
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, desc="train classifier" + (" (DP)" if dp else ""), unit="step")
    record: dict = {}
    for step, idx in enumerate(batches):
        for g in opt.param_groups:
            g["lr"] = warmup_cosine(step, base_lr=cfg.lr, warmup=max(1, cfg.steps // 10), total=cfg.steps)
        items = train.__getitems__(idx) if idx else []
        batch = {"images": torch.stack([it["image"] for it in items]) if items else
                 torch.zeros(0, 3, model.image_size, model.image_size),
                 "labels": torch.tensor([it["label"] for it in items], dtype=torch.long)}
        t0 = time.perf_counter()
        if dp is not None:
            res = dp.step(batch)
            loss, record = float(res.loss), {"epsilon": res.epsilon, "clipped": res.clipped}
        else:
            l = per_example_loss(params, batch).mean()
            opt.zero_grad()
            l.backward()
            opt.step()
            loss = float(l.detach())
        record = {"step": step + 1, "loss": loss, "batch": len(idx),
                  "samples_per_s": len(idx) / max(time.perf_counter() - t0, 1e-9)} | record
        log.write(record)
        if bar is not None:
            bar.set_postfix({k: f"{v:.3g}" for k, v in record.items() if k in ("loss", "epsilon")})
            bar.update(1)
    if bar is not None:
        bar.close()
    with torch.no_grad():
        p = pytree.unflatten({k: v.detach() for k, v in leaves.items()})
        items = evals.__getitems__(list(range(len(evals))))
        pred = logits(p, torch.stack([it["image"] for it in items])).argmax(-1)
        acc = float((pred == torch.tensor([it["label"] for it in items])).float().mean())
    final = {"step": cfg.steps, "eval/accuracy": acc}
    if dp is not None:
        final |= {"epsilon": dp.epsilon, "noise_multiplier": dp.noise_multiplier}
    log.write(final)
    plot_metrics(read_metrics(out), out / "curves.png", title=f"classifier ({cfg.preset})" + (" with DP-SGD" if dp else ""))
    pytree.save(out / "params.safetensors", p)
    return final
