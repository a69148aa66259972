"""MDETR through the platform: shells from the registry, checkpoints through the hub, the training task."""

import pytest
import torch

import polymodal.nn
from polymodal.core import random as pr
from polymodal.models.mdetr import build, load_pretrained, read_checkpoint, to_torchmultimodal
from polymodal.models.mdetr import pretrained as pre
from polymodal.models.mdetr.task import mdetr_loss
from polymodal.train import LoopConfig, make_task


def test_shell_equals_spec():
    shell = polymodal.nn.build("mdetr_tiny", key=pr.key(0)).eval()
    spec, params = shell.spec, shell.params
    x, ids = torch.rand(1, 3, 64, 64), torch.tensor([[0, 5, 6, 2]])
    with torch.no_grad():
        a, b = shell(x, ids), spec(params, x, ids)
    torch.testing.assert_close(a.model_output.pred_boxes, b.model_output.pred_boxes)
    assert set(shell.state_dict()) == set(__import__("polymodal.core.pytree", fromlist=["f"]).flatten(params))


def test_pretrained_reads_a_training_checkpoint_through_the_hub(tmp_path, monkeypatch):
    spec = build("mdetr_tiny")
    params = spec.init(key=pr.key(0))
    ema = spec.init(key=pr.key(1))
    f = tmp_path / "ckpt.pth"
    torch.save({"model": to_torchmultimodal(params, spec), "model_ema": to_torchmultimodal(ema, spec), "epoch": 3}, f)
    assert torch.equal(read_checkpoint(f)["model.query_embed.weight"], ema["model"]["query_embed"]["weight"])
    assert torch.equal(read_checkpoint(f, ema=False)["model.query_embed.weight"], params["model"]["query_embed"]["weight"])
    seen = {}

    def fake_fetch(filename, urls, sha256=None, **kw):
        seen.update(filename=filename, urls=urls)
        return f

    monkeypatch.setattr(pre.hub, "fetch", fake_fetch)
    monkeypatch.setitem(pre._BUILDERS, "mdetr_resnet101_pretrained", lambda: spec)
    got = load_pretrained()
    assert seen["urls"] == pre.URLS["mdetr_resnet101_pretrained"] and seen["filename"].startswith("mdetr/")
    assert torch.equal(got.params["model"]["class_embed"]["weight"], ema["model"]["class_embed"]["weight"])
    with pytest.raises(ValueError, match="unknown MDETR checkpoint 'nope'"):
        load_pretrained("nope")


@pytest.mark.parametrize("preset", ["tiny", "tiny-vqa"])
def test_task_loss_step_and_evaluation(preset, tmp_path):
    task = make_task("mdetr", preset, {"train_size": 8, "eval_size": 4}, LoopConfig(steps=1, batch_size=4,
                                                                                     out=str(tmp_path)))
    params, _ = task.init(pr.key(0))
    leaves = __import__("polymodal.core.pytree", fromlist=["f"])
    flat = {k: v.requires_grad_() for k, v in leaves.flatten(params).items()}
    batch = next(iter(task.train_batches(0, 0, 1)))
    loss, parts = mdetr_loss(task.model, leaves.unflatten(flat), batch, pr.key(1))
    loss.backward()
    assert torch.isfinite(loss) and set(parts) >= {"soft_token", "l1", "giou", "contrastive"}
    assert ("vqa" in parts) == (preset == "tiny-vqa")
    assert flat["model.transformer.decoder.layers.0.linear1.weight"].grad is not None
    m = task.evaluate(params, None, device="cpu")
    assert 0 <= m["eval/recall@1"] <= m["eval/recall@5"] <= 1
    assert ("eval/vqa_accuracy" in m) == (preset == "tiny-vqa")
    assert (tmp_path / "mdetr_grounding.png").stat().st_size > 0
