"""MDETR's pieces on their own: the frozen-norm ResNet against torchvision, the sine position embedding
against TorchMultimodal's, generic spec checks (shell, vmap, grad, compile, safetensors), post-processing
by hand, the synthetic scenes and the JSONL format, and bad input."""

import json
import math

import pytest
import torch
import torchvision
from torchmultimodal.models.mdetr.image_encoder import PositionEmbedding2D
from torchvision.ops.misc import FrozenBatchNorm2d as TVFrozenBN

from checks import check_spec, randomize
from polymodal.core import random as pr
from polymodal.core.encoders.resnet import ResNet, from_torchvision, resnet, resnet18, to_torchvision
from polymodal.data.grounding import GroundingJSONL, GroundingScenes, WordTokenizer, check_target, token_map
from polymodal.models.mdetr import (
    FeatureResizer, hungarian_match, mdetr_tiny, rank_phrase_boxes, recall_at_k, sine_position_embedding_2d,
    to_image_boxes,
)


def test_resnet_matches_torchvision_with_frozen_batch_norm():
    ref = torchvision.models.resnet.ResNet(torchvision.models.resnet.Bottleneck, [1, 2, 1, 1], norm_layer=TVFrozenBN,
                                           width_per_group=64).eval()
    torch.manual_seed(0)
    for m in ref.modules():
        if isinstance(m, TVFrozenBN):
            m.weight.uniform_(0.5, 1.5), m.bias.normal_(0, 0.1), m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    spec = resnet(layers=(1, 2, 1, 1))
    p = from_torchvision(ref.state_dict(), spec)
    x = torch.randn(2, 3, 64, 48)
    body = torch.nn.Sequential(*list(ref.children())[:-2])
    with torch.no_grad():
        torch.testing.assert_close(spec(p, x), body(x), rtol=1e-5, atol=1e-5)
    sd = to_torchvision(p, spec)
    assert all(torch.equal(sd[k], v) for k, v in ref.state_dict().items() if k in sd)
    assert set(ref.state_dict()) - set(sd) == {"fc.weight", "fc.bias"}


def test_resnet_gradients_match_torchvision_with_frozen_stem_and_layer1():
    """Forward + backward against torchvision with frozen batch norm and TorchMultimodal's freezing (stem and
    layer1): the in-place scale / shift on fresh convolution outputs leaves the gradients as the reference's."""
    ref = torchvision.models.resnet.ResNet(torchvision.models.resnet.Bottleneck, [1, 2, 1, 1], norm_layer=TVFrozenBN)
    torch.manual_seed(0)
    for m in ref.modules():
        if isinstance(m, TVFrozenBN):
            m.weight.uniform_(0.5, 1.5), m.bias.normal_(0, 0.1), m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    for name, q in ref.named_parameters():
        q.requires_grad_(name.startswith(("layer2", "layer3", "layer4")))
    spec = resnet(layers=(1, 2, 1, 1), trainable_layers=3)
    from polymodal.core.pytree import flatten, unflatten
    leaves = {k: v.requires_grad_() for k, v in flatten(from_torchvision(ref.state_dict(), spec)).items()}
    x, g = torch.randn(2, 3, 64, 48), torch.randn(2, 2048, 2, 2)
    body = torch.nn.Sequential(*list(ref.children())[:-2])
    (body(x) * g).sum().backward()
    (spec(unflatten(leaves), x) * g).sum().backward()
    want = {k: p.grad for k, p in ref.named_parameters() if p.requires_grad}
    assert {k for k, v in leaves.items() if v.grad is not None} == set(want)
    for k, v in want.items():
        torch.testing.assert_close(leaves[k].grad, v, rtol=1e-4, atol=1e-5)


def test_frozen_batch_norm_in_place_only_on_fresh_plain_tensors():
    from polymodal.core.encoders.resnet import FrozenBatchNorm2d
    bn = FrozenBatchNorm2d(3)
    p = {"weight": torch.tensor([1.0, 2.0, 3.0]), "bias": torch.tensor([0.5, 0.0, -1.0]),
         "running_mean": torch.tensor([0.0, 1.0, 2.0]), "running_var": torch.tensor([1.0, 4.0, 0.25])}
    x = torch.randn(2, 3, 4, 4)
    scale = p["weight"] / (p["running_var"] + 1e-5).sqrt()
    want = x * scale.view(1, 3, 1, 1) + (p["bias"] - p["running_mean"] * scale).view(1, 3, 1, 1)
    y = bn(p, x.clone())  # default: x untouched
    torch.testing.assert_close(y, want)
    fresh = x.clone()
    assert bn(p, fresh, fresh=True) is fresh and torch.allclose(fresh, want)  # overwritten, same values
    xs = x.clone()
    out = torch.vmap(lambda t: bn(p, t[None], fresh=True)[0])(xs)  # under vmap: out of place
    torch.testing.assert_close(out, want)
    assert torch.equal(xs, x)


def test_resnet_frozen_parts_get_no_gradient():
    spec = resnet(layers=(1, 1, 1, 1), block="basic", width=8, trainable_layers=3)
    p = spec.init(key=pr.key(0))
    leaves = {k: v.requires_grad_() for k, v in __import__("polymodal.core.pytree", fromlist=["x"]).flatten(p).items()}
    from polymodal.core.pytree import unflatten
    spec(unflatten(leaves), torch.randn(1, 3, 64, 64)).sum().backward()
    frozen = [k for k, v in leaves.items() if v.grad is None]
    # every batch norm, the stem and layer1 are frozen (MDETR); layer2..4 convolutions train
    assert all(".bn" in k or k.startswith(("bn1", "conv1", "layer1")) or "downsample.1" in k for k in frozen)
    assert "layer2.0.conv1.weight" not in frozen and "conv1.weight" in frozen and "layer1.0.conv2.weight" in frozen


def test_resnet_check_spec():
    spec = resnet(layers=(1, 1, 1, 1), block="basic", width=4)
    p = spec.init(key=pr.key(1))  # (randomized running variances could be negative)
    check_spec(spec, p, [torch.randn(2, 3, 32, 32)], vmap_inputs=[torch.randn(2, 1, 3, 32, 32)], compile=False,
               atol=1e-4)


@pytest.mark.parametrize("scale", [None, 2 * math.pi])
def test_sine_position_embedding_matches_torchmultimodal(scale):
    mask = torch.zeros(2, 5, 7, dtype=torch.bool)
    mask[1, 3:, :] = True
    mask[1, :, 5:] = True
    want = PositionEmbedding2D(8, scale=scale)(mask)
    torch.testing.assert_close(sine_position_embedding_2d(mask, 8, scale=scale), want)


def test_feature_resizer_check_spec():
    spec = FeatureResizer(6, 4, dropout=0.0)
    check_spec(spec, randomize(spec.init(key=pr.key(0)), 0), [torch.randn(2, 3, 6)])


def test_tiny_model_shapes_and_errors():
    g = mdetr_tiny()
    p = g.init(key=pr.key(0))
    out = g(p, torch.rand(2, 3, 64, 64), torch.tensor([[0, 5, 6, 2], [0, 7, 2, 1]]))
    assert out.model_output.pred_boxes.min() >= 0 and out.model_output.pred_boxes.max() <= 1
    assert out.model_output.aux_logits.shape == (2, 2, 8, 256)
    torch.testing.assert_close(out.query_embeddings.norm(dim=-1), torch.ones(2, 8))
    with pytest.raises(ValueError, match="same B"):
        g(p, torch.rand(2, 3, 64, 64), torch.tensor([[0, 5, 2]]))
    with pytest.raises(ValueError, match=r"image_mask: expected a bool tensor \(2, 64, 64\)"):
        g(p, torch.rand(2, 3, 64, 64), torch.tensor([[0, 5, 2], [0, 5, 2]]), torch.zeros(2, 32, 32, dtype=torch.bool))


def test_postprocessing_by_hand():
    boxes = to_image_boxes(torch.tensor([[[0.5, 0.25, 0.5, 0.5]]]), torch.tensor([[40, 80]]))
    assert boxes.tolist() == [[[20.0, 0.0, 60.0, 20.0]]]  # W = 80, H = 40
    logits = torch.full((1, 3, 4), -10.0)
    logits[0, 2, 1] = 10.0  # query 2 names token 1
    logits[0, 0, 2] = 10.0  # query 0 names token 2
    pmaps = torch.tensor([[[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]]])
    pred = torch.tensor([[[0.1, 0.1, 0.1, 0.1], [0.5, 0.5, 0.1, 0.1], [0.9, 0.9, 0.1, 0.1]]])
    ranked, _ = rank_phrase_boxes(logits, pred, pmaps, torch.tensor([[10, 10]]), k=1)
    torch.testing.assert_close(ranked[0, :, 0], torch.tensor([[8.5, 8.5, 9.5, 9.5], [0.5, 0.5, 1.5, 1.5]]))
    r = recall_at_k([ranked[0, 0], ranked[0, 1]], [torch.tensor([[8.5, 8.5, 9.5, 9.5]]), torch.tensor([[5.0, 5, 6, 6]])])
    assert r == {1: 0.5, 5: 0.5}


def test_matcher_empty_targets_and_bad_input():
    logits, boxes = torch.zeros(2, 4, 6), torch.full((2, 4, 4), 0.5)
    idx = hungarian_match(logits, boxes, [torch.zeros(0, 4), torch.zeros(0, 4)], torch.zeros(0, 6))
    assert all(len(a) == 0 and len(b) == 0 for a, b in idx)
    with pytest.raises(ValueError, match="one target tensor per sample"):
        hungarian_match(logits, boxes, [torch.zeros(0, 4)], torch.zeros(0, 6))
    with pytest.raises(ValueError, match=r"positive_map: expected \(N, 6\)"):
        hungarian_match(logits, boxes, [torch.full((1, 4), 0.5), torch.zeros(0, 4)], torch.zeros(1, 5))


def test_scenes_are_deterministic_and_spans_name_their_words():
    a, b = GroundingScenes("train", 6, 64, seed=3), GroundingScenes("train", 6, 64, seed=3)
    tok = WordTokenizer()
    for i in range(6):
        x, y = a[i], b[i]
        assert torch.equal(x["image"], y["image"]) and x["caption"] == y["caption"]
        check_target(x["caption"], x["phrases"], x["boxes"], (64, 64))
        ids, off = tok.encode(x["caption"])
        assert 3 not in ids  # no unknown word
        tm = token_map(off, x["phrases"])
        words = x["caption"].split(" ")
        assert [w for w, t in zip(words, tm[0, 1:-1]) if t] == x["caption"][slice(*x["phrases"][0])].split(" ")
        assert x["image"][:, int(x["boxes"][0, 1]):int(x["boxes"][0, 3]),
                          int(x["boxes"][0, 0]):int(x["boxes"][0, 2])].numel() > 0
    assert GroundingScenes("eval", 2, 64, seed=3)[0]["caption"] != a[0]["caption"] or not torch.equal(
        GroundingScenes("eval", 2, 64, seed=3)[0]["image"], a[0]["image"])


def test_bad_targets_name_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match=r"phrase 0: expected a span 0 <= start < end <= 5"):
        check_target("a dog", [(0, 9)], torch.zeros(0, 4), (10, 10))
    with pytest.raises(ValueError, match=r"box 0: expected x1 < x2 and y1 < y2, got \[5.0, 0.0, 2.0, 4.0\]"):
        check_target("a dog", [(0, 5)], torch.tensor([[5.0, 0, 2, 4]]), (10, 10))
    with pytest.raises(ValueError, match=r"box 0: expected inside the image \[0, 10\] x \[0, 10\]"):
        check_target("a dog", [(0, 5)], torch.tensor([[0.0, 0, 12, 4]]), (10, 10))
    from PIL import Image
    Image.new("RGB", (10, 8), (255, 0, 0)).save(tmp_path / "a.png")
    rows = [{"image": "a.png", "caption": "a red box", "phrases": [{"start": 0, "end": 9, "boxes": [[1, 1, 5, 5]]}]},
            {"image": "a.png", "caption": "nothing", "phrases": []},
            {"image": "a.png", "caption": "a box", "phrases": [{"start": 0, "end": 5, "boxes": [[1, 1, 12, 5]]}]}]
    (tmp_path / "g.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    ds = GroundingJSONL(tmp_path / "g.jsonl")
    assert ds[0]["image"].shape == (3, 8, 10) and ds[0]["boxes"].tolist() == [[1, 1, 5, 5]]
    assert ds[1]["boxes"].shape == (0, 4)  # empty targets: every query is "no object"
    with pytest.raises(ValueError, match=r"g.jsonl:3: box 0: expected inside the image \[0, 10\] x \[0, 8\]"):
        ds[2]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"image": "a.png", "caption": "x", "phrases": [{"start": 0}]}))
    with pytest.raises(ValueError, match=r"bad.jsonl:1: phrase 0: expected \{\"start\": int"):
        GroundingJSONL(tmp_path / "bad.jsonl")
