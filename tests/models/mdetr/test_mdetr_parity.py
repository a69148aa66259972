"""MDETR against TorchMultimodal: randomly initialised reference models (small configuration built from
the installed classes, the backbone from torchvision without downloading weights) -> weights converted ->
same logits, boxes, alignment embeddings and VQA logits; exact round trips; the full configuration's
layout by keys and shapes on the meta device. Matching and losses against ``examples/mdetr/matcher.py``
and ``examples/mdetr/loss.py`` (TorchMultimodal's repository, not installed: minimal copies below) and
the installed ``torchmultimodal.modules.losses.mdetr``."""

import math

import pytest
import torch
import torchvision
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchmultimodal.models.mdetr import model as tmm_model
from torchmultimodal.models.mdetr.image_encoder import (
    FrozenBatchNorm2d, MaskedIntermediateLayer, PositionEmbedding2D, mdetr_resnet101_backbone,
)
from torchmultimodal.models.mdetr.text_encoder import FeatureResizer, mdetr_roberta_text_encoder
from torchmultimodal.models.mdetr.transformer import mdetr_transformer
from torchmultimodal.modules.layers.mlp import MLP
from torchmultimodal.modules.losses.mdetr import box_losses as tmm_box_losses
from torchmultimodal.modules.losses.mdetr import soft_token_prediction_loss
from torchvision.ops.boxes import box_convert, generalized_box_iou

from polymodal.core import random as pr
from polymodal.core.encoders.bert import bert_text_encoder
from polymodal.core.encoders.resnet import resnet
from polymodal.core.pytree import flatten
from polymodal.models.mdetr import (
    MDETRForPhraseGrounding, MDETRForVQA, box_losses, contrastive_alignment_loss, from_torchmultimodal,
    hungarian_match, mdetr, mdetr_for_vqa, pad_images, pad_text, soft_token_loss, to_torchmultimodal,
    torchmultimodal_table,
)

TOL = dict(rtol=1e-5, atol=1e-5)
HEADS = (("answer_type", 5), ("answer_obj", 3), ("answer_attr", 7))


def _reference(extra: int):
    """A small TorchMultimodal MDETR: resnet with one basic block per stage, 1-layer text encoder, 2 + 2 DETR."""
    torch.manual_seed(0)
    body = torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1],
                                            norm_layer=FrozenBatchNorm2d)
    for m in body.modules():  # non-trivial frozen statistics
        if isinstance(m, FrozenBatchNorm2d):
            m.weight.uniform_(0.5, 1.5), m.bias.normal_(0, 0.1), m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    text = mdetr_roberta_text_encoder(embedding_dim=32, vocab_size=64, max_position_embeddings=40, ffn_dimension=64,
                                      num_attention_heads=2, num_encoder_layers=1, embedding_dropout_prob=0.0,
                                      encoder_dropout_prob=0.0)
    model = tmm_model.MDETR(MaskedIntermediateLayer(body, "layer4"), text, mdetr_transformer(32, 2, 2, 2, 64, 0.0),
                            PositionEmbedding2D(16, scale=2 * math.pi), FeatureResizer(32, 32, dropout=0.0),
                            nn.Conv2d(512, 32, 1), nn.Embedding(8, 32), MLP(32, 4, [32] * 2, dropout=0.0),
                            nn.Linear(32, 256), nn.Embedding(extra, 32) if extra else None)
    proj = (nn.Linear(32, 16), nn.Linear(32, 16))
    if extra:
        heads = nn.ModuleDict({n: nn.Linear(32, c) for n, c in HEADS})
        return tmm_model.MDETRForVQA(model, heads, *proj).eval()
    return tmm_model.MDETRForPhraseGrounding(model, *proj).eval()


def _ours(extra: int):
    text = bert_text_encoder(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                             max_position_embeddings=40, type_vocab_size=1, pad_token_id=1, layer_norm_eps=1e-5,
                             position_offset=True, pooler=False)
    m = mdetr(resnet(layers=(1, 1, 1, 1), block="basic", width=64), text, num_queries=8, d_model=32, num_heads=2,
              num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=64, dropout=0.0, num_extra_queries=extra)
    return MDETRForVQA(m, HEADS, 16) if extra else MDETRForPhraseGrounding(m, 16)


def _inputs():
    g = torch.Generator().manual_seed(1)
    images = [torch.randn(3, 64, 80, generator=g), torch.randn(3, 48, 64, generator=g)]
    texts = [torch.tensor([0, 5, 9, 33, 2]), torch.tensor([0, 7, 2])]
    return images, texts


@pytest.mark.parametrize("extra", [0, 3])
def test_outputs_match_torchmultimodal(extra):
    ref, spec = _reference(extra), _ours(extra)
    sd = ref.state_dict()
    params = from_torchmultimodal(sd, spec)
    back = to_torchmultimodal(params, spec)
    assert list(back) == list(sd) or set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)  # exact round trip
    images, texts = _inputs()
    with torch.no_grad():
        want = ref(images, texts)
        x, mask = pad_images(images)
        ids, pad = pad_text(texts)
        got = spec(params, x, ids, mask, pad)
    mo = want.model_output
    torch.testing.assert_close(got.model_output.pred_logits, mo.pred_logits, **TOL)
    torch.testing.assert_close(got.model_output.pred_boxes, mo.pred_boxes, **TOL)
    torch.testing.assert_close(got.model_output.decoder_hidden_states,
                               mo.transformer_output.decoder_hidden_states, **TOL)
    torch.testing.assert_close(got.query_embeddings, want.contrastive_embeddings.query_embeddings, **TOL)
    torch.testing.assert_close(got.token_embeddings, want.contrastive_embeddings.token_embeddings, **TOL)
    # every layer's projected queries (the original MDETR's proj_queries): the reference's projection of its
    # decoder states; TorchMultimodal itself returns only the last layer's
    with torch.no_grad():
        aux = torch.nn.functional.normalize(
            ref.contrastive_alignment_image_projection(mo.transformer_output.decoder_hidden_states), p=2, dim=-1)
    torch.testing.assert_close(got.aux_query_embeddings, aux, **TOL)
    torch.testing.assert_close(got.aux_query_embeddings[-1], got.query_embeddings, **TOL)
    if extra:
        assert list(got.vqa_preds) == list(want.vqa_preds)
        for k in want.vqa_preds:
            torch.testing.assert_close(got.vqa_preds[k], want.vqa_preds[k], **TOL)


@pytest.fixture
def cheap_meta_keys(monkeypatch):
    """Meta-device inits never read values: a stand-in key hash keeps them fast (as tests/core/test_convert.py)."""
    from polymodal.core.convert import _meta
    monkeypatch.setattr(pr, "_hash", lambda k, c: k[..., 0].reshape(k.shape[:-1] + (1,) * c.dim()) ^ c)
    _meta.cache_clear()
    yield
    _meta.cache_clear()


def test_full_configuration_layout_matches_torchmultimodal(monkeypatch, cheap_meta_keys):
    # the reference's builder, its backbone without downloaded weights, on the meta device
    monkeypatch.setattr(tmm_model, "mdetr_resnet101_backbone", lambda: mdetr_resnet101_backbone(weights=None))
    with torch.device("meta"):
        ref = tmm_model.mdetr_for_vqa()
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    spec = mdetr_for_vqa()
    got = torchmultimodal_table(spec).expected(spec)
    assert got == want
    assert sum(math.prod(s) for s in want.values()) == 185_722_414


def test_resnet101_converts_from_torchvision(cheap_meta_keys):
    from polymodal.core.encoders.resnet import from_torchvision, resnet101
    with torch.device("meta"):
        sd = torchvision.models.resnet101(weights=None).state_dict()
    got = {k: tuple(v.shape) for k, v in flatten(from_torchvision(sd, resnet101())).items()}
    assert got == {k: tuple(v.shape) for k, v in sd.items() if not k.startswith("fc.") and "num_batches" not in k}


# --- minimal copies of examples/mdetr/matcher.py (HungarianMatcher.forward) and examples/mdetr/loss.py
# (contrastive_alignment_loss + construct_positive_map), facebookresearch/multimodal


@torch.no_grad()
def ref_match(pred_logits, pred_boxes, target_boxes_per_sample, positive_map, cost_class=1, cost_bbox=5, cost_giou=2):
    bs, num_queries = pred_logits.shape[:2]
    target_boxes = torch.cat(target_boxes_per_sample)
    out_prob = pred_logits.flatten(0, 1).softmax(-1)
    out_bbox = pred_boxes.flatten(0, 1)
    c_class = -(out_prob.unsqueeze(1) * positive_map.unsqueeze(0)).sum(-1)
    c_bbox = torch.cdist(out_bbox, target_boxes, p=1)
    c_giou = -generalized_box_iou(box_convert(out_bbox, "cxcywh", "xyxy"), box_convert(target_boxes, "cxcywh", "xyxy"))
    c = (cost_bbox * c_bbox + cost_class * c_class + cost_giou * c_giou).view(bs, num_queries, -1)
    sizes = [x.size(0) for x in target_boxes_per_sample]
    idx = [linear_sum_assignment(m[i]) for i, m in enumerate(c.split(sizes, -1))]
    return [(torch.as_tensor(i, dtype=torch.int64), torch.as_tensor(j, dtype=torch.int64)) for i, j in idx]


class _Tokenized:  # the fast tokenizer's char_to_token, here the identity (character i is token i)
    def __init__(self, n):
        self.n = n

    def __getitem__(self, b):
        return self

    def char_to_token(self, c, seq=0):
        return c


def ref_contrastive(queries, tokens, target_tokens, indices, num_boxes, tokenized, temperature=0.07):
    logits = torch.matmul(queries, tokens.transpose(-1, -2)) / temperature
    positive_map = torch.zeros(logits.shape, dtype=torch.bool)
    for i, ((idx_src, idx_tgt), tgt) in enumerate(zip(indices, target_tokens)):
        for j, tok_list in enumerate([tgt[j] for j in idx_tgt]):
            for beg, end in tok_list:
                b, e = tokenized[i].char_to_token(beg), tokenized[i].char_to_token(end - 1)
                positive_map[i, idx_src[j], b: e + 1].fill_(True)
    positive_logits, negative_logits = -logits.masked_fill(~positive_map, 0), logits
    boxes_with_pos = positive_map.any(2)
    b2t = ((positive_logits.sum(2) / (positive_map.sum(2) + 1e-6) + negative_logits.logsumexp(2))
           .masked_fill(~boxes_with_pos, 0).sum())
    tokens_with_pos = positive_map.any(1)
    t2b = ((positive_logits.sum(1) / (positive_map.sum(1) + 1e-6) + negative_logits.logsumexp(1))
           .masked_fill(~tokens_with_pos, 0).sum())
    return (b2t + t2b) / 2 / num_boxes


def _targets(seed, b=3, q=10, t=12, c=16):
    k = pr.key(seed)
    ks = pr.split(k, 8)
    logits = pr.normal(ks[0], (b, q, c))
    boxes = torch.cat([pr.uniform(ks[1], (b, q, 2)) * 0.6 + 0.2, pr.uniform(ks[2], (b, q, 2)) * 0.3 + 0.05], -1)
    n = [2, 0, 3][:b]
    tboxes = [torch.cat([pr.uniform(pr.fold_in(ks[3], i), (m, 2)) * 0.6 + 0.2,
                         pr.uniform(pr.fold_in(ks[4], i), (m, 2)) * 0.3 + 0.05], -1) for i, m in enumerate(n)]
    spans = [[[(1 + 3 * j, 3 + 3 * j)] for j in range(m)] for m in n]  # token span [beg, end) per box
    token_maps = []
    for sp in spans:
        tm = torch.zeros(len(sp), t, dtype=torch.bool)
        for j, ((beg, end),) in enumerate(sp):
            tm[j, beg:end] = True
        token_maps.append(tm)
    pm = torch.cat([torch.nn.functional.pad(tm.float(), (0, c - t)) for tm in token_maps])
    pm = pm / pm.sum(-1, keepdim=True)
    return logits, boxes, tboxes, spans, token_maps, pm, n


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matching_and_losses_match_the_reference(seed):
    logits, boxes, tboxes, spans, token_maps, pm, n = _targets(seed)
    ours = hungarian_match(logits, boxes, tboxes, pm)
    want = ref_match(logits, boxes, tboxes, pm)
    for (a, b), (c, d) in zip(ours, want):
        assert torch.equal(a, c) and torch.equal(b, d)
    num = float(max(sum(n), 1))
    torch.testing.assert_close(soft_token_loss(logits, pm, n, ours, num),
                               soft_token_prediction_loss(logits, n, pm, ours, num), **TOL)
    l1, giou = box_losses(boxes, tboxes, ours, num)
    ref = tmm_box_losses(boxes, tboxes, ours, num)
    torch.testing.assert_close(l1, ref.l1_loss, **TOL)
    torch.testing.assert_close(giou, ref.giou_loss, **TOL)
    q = torch.nn.functional.normalize(pr.normal(pr.key(seed + 10), (3, 10, 8)), dim=-1)
    t = torch.nn.functional.normalize(pr.normal(pr.key(seed + 11), (3, 12, 8)), dim=-1)
    torch.testing.assert_close(contrastive_alignment_loss(q, t, token_maps, ours, num),
                               ref_contrastive(q, t, spans, ours, num, _Tokenized(12)), **TOL)


def _reference_loss(ref, images, texts, boxes, spans, pm, n, layers):
    """MDETR's weighted loss composed from the reference pieces over the given decoder layers: the original
    MDETR's SetCriterion charges every layer (own matching, own projected queries) with every loss;
    TorchMultimodal's examples/mdetr training loops charge only the last."""
    out = ref(images, texts)
    hs = out.model_output.transformer_output.decoder_hidden_states
    logits, bx = ref.model.class_embed(hs), ref.model.bbox_embed(hs).sigmoid()
    proj = torch.nn.functional.normalize(ref.contrastive_alignment_image_projection(hs), p=2, dim=-1)
    tokens = out.contrastive_embeddings.token_embeddings
    num, total = float(max(sum(n), 1)), 0.0
    for layer in layers:
        idx = ref_match(logits[layer].detach(), bx[layer].detach(), boxes, pm)
        bl = tmm_box_losses(bx[layer], boxes, idx, num)
        total = total + soft_token_prediction_loss(logits[layer], n, pm, idx, num) + 5 * bl.l1_loss + 2 * bl.giou_loss
        total = total + ref_contrastive(proj[layer], tokens, spans, idx, num, _Tokenized(tokens.shape[1]))
    return total


@pytest.mark.parametrize("aux_loss", [True, False])
def test_training_loss_matches_the_reference_composition(aux_loss):
    from polymodal.models.mdetr.task import mdetr_loss

    ref, spec = _reference(0), _ours(0)
    params = from_torchmultimodal(ref.state_dict(), spec)
    images, texts = _inputs()
    n = [2, 1]
    g = torch.Generator().manual_seed(2)
    boxes = [torch.cat([torch.rand(m, 2, generator=g) * 0.6 + 0.2, torch.rand(m, 2, generator=g) * 0.3 + 0.05], -1)
             for m in n]
    spans = [[[(1, 3)], [(3, 4)]], [[(1, 2)]]]  # token spans [beg, end) per box (texts of 5 and 3 tokens)
    token_maps = [torch.zeros(m, 5, dtype=torch.bool) for m in n]
    for tm, sp in zip(token_maps, spans):
        for j, ((beg, end),) in enumerate(sp):
            tm[j, beg:end] = True
    pm = torch.nn.functional.pad(torch.cat(token_maps).float(), (0, 256 - 5))
    pm = pm / pm.sum(-1, keepdim=True)
    layers = [0, 1] if aux_loss else [1]
    want = _reference_loss(ref, images, texts, boxes, spans, pm, n, layers)
    x, mask = pad_images(images)
    ids, pad = pad_text(texts)
    batch = {"images": x, "image_mask": mask, "input_ids": ids, "text_padding_mask": pad, "boxes": boxes,
             "positive_map": pm, "token_maps": token_maps}
    got, parts = mdetr_loss(spec, params, batch, None, aux_loss=aux_loss)
    torch.testing.assert_close(got, want.detach(), **TOL)
    assert parts["contrastive"] > 0


@pytest.mark.slow
def test_full_size_outputs_match_torchmultimodal(monkeypatch):
    monkeypatch.setattr(tmm_model, "mdetr_resnet101_backbone", lambda: mdetr_resnet101_backbone(weights=None))
    torch.manual_seed(0)
    ref = tmm_model.mdetr_for_vqa().eval()
    spec = mdetr_for_vqa()
    params = from_torchmultimodal(ref.state_dict(), spec)
    images = [torch.randn(3, 128, 160), torch.randn(3, 96, 128)]
    texts = [torch.tensor([0, 713, 16, 10, 2335, 2]), torch.tensor([0, 4083, 2])]
    with torch.no_grad():
        want = ref(images, texts)
        x, mask = pad_images(images)
        ids, pad = pad_text(texts)
        got = spec(params, x, ids, mask, pad)
    torch.testing.assert_close(got.model_output.pred_logits, want.model_output.pred_logits, **TOL)
    torch.testing.assert_close(got.model_output.pred_boxes, want.model_output.pred_boxes, **TOL)
    torch.testing.assert_close(got.query_embeddings, want.contrastive_embeddings.query_embeddings, **TOL)
    torch.testing.assert_close(got.token_embeddings, want.contrastive_embeddings.token_embeddings, **TOL)
    for k in want.vqa_preds:
        torch.testing.assert_close(got.vqa_preds[k], want.vqa_preds[k], **TOL)
