"""ALBEFForVQA against TorchMultimodal's ``examples/albef/model.py`` VQA model (minimal copies below of its
``PredictionHead``, ``ALBEFDecoder`` and ``ALBEFModelForVQA``, composed from the installed package's
classes): the training loss, its gradients and the momentum state after a step, and the ranked answers."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from polymodal.core import pytree
from polymodal.models.albef.builders import albef_vqa
from polymodal.models.albef.convert import from_torchmultimodal, to_torchmultimodal

tmm_albef = pytest.importorskip("torchmultimodal.models.albef.model")
from torchmultimodal.models.albef.image_encoder import ALBEFVisionEncoder  # noqa: E402
from torchmultimodal.models.albef.multimodal_encoder import ALBEFMultimodalEncoder  # noqa: E402
from torchmultimodal.modules.encoders.bert_text_encoder import bert_text_encoder  # noqa: E402
from torchmultimodal.modules.layers.text_embedding import BERTTextEmbeddings  # noqa: E402
from torchmultimodal.modules.losses.albef import CausalLanguageModelingLoss  # noqa: E402
from torchmultimodal.utils.attention import get_causal_attention_mask  # noqa: E402
from torchmultimodal.utils.common import momentum_update, remove_grad  # noqa: E402

H, V = 16, 40
CFG = dict(image_size=16, patch_size=8, vision_width=H, vision_layers=1, vision_heads=2, vision_mlp=32, vocab_size=V,
           hidden_size=H, text_layers=1, multimodal_layers=2, num_heads=2, intermediate_size=32,
           max_position_embeddings=12)
SPEC = albef_vqa(**CFG)


class RefHead(nn.Module):  # examples/albef/model.py: PredictionHead
    def __init__(self):
        super().__init__()
        self.dense, self.layer_norm, self.decoder = nn.Linear(H, H), nn.LayerNorm(H, eps=1e-12), nn.Linear(H, V)

    def forward(self, h):
        return self.decoder(self.layer_norm(nn.functional.gelu(self.dense(h))))


class RefDecoder(nn.Module):  # examples/albef/model.py: ALBEFDecoder
    def __init__(self):
        super().__init__()
        self.text_embeddings = BERTTextEmbeddings(hidden_size=H, vocab_size=V, max_position_embeddings=12)
        self.multimodal_encoder = ALBEFMultimodalEncoder(H, 2, 2, 32)
        self.prediction_head = RefHead()

    def forward(self, input_ids, attention_mask, encoder_hidden_states, encoder_attention_mask):
        b, t = attention_mask.shape
        causal = get_causal_attention_mask(t).repeat(b, 1).view(b, t, t)
        mask = (causal[:, None] * attention_mask[:, None, None, :]).to(attention_mask.dtype)
        h = self.multimodal_encoder(self.text_embeddings(input_ids), mask, encoder_hidden_states,
                                    encoder_attention_mask)
        return self.prediction_head(h)


class RefVQA(nn.Module):  # examples/albef/model.py: ALBEFModelForVQA (_train_forward, _eval_forward)
    def __init__(self, model, decoder):
        super().__init__()
        self.model, self.answer_decoder, self.loss = model, decoder, CausalLanguageModelingLoss()
        self.answer_decoder_m = copy.deepcopy(decoder)
        remove_grad(self.answer_decoder_m)

    def train_loss(self, image, question, question_atts, answers, answers_atts, weights, lengths, alpha):
        out = self.model(image, question, question_atts)
        rep = lambda t: torch.stack([t[b] for b, n in enumerate(lengths) for _ in range(n)])  # noqa: E731
        with torch.no_grad():
            momentum_update(self.answer_decoder, self.answer_decoder_m, self.model.momentum)
            scores_m = self.answer_decoder_m(answers, answers_atts, rep(out.multimodal_embeddings_m),
                                             rep(question_atts))
        scores = self.answer_decoder(answers, answers_atts, rep(out.multimodal_embeddings), rep(question_atts))
        labels = answers.masked_fill(answers == 0, self.loss.mask_token_id)
        return (weights * self.loss(labels, scores, scores_m, alpha)).sum() / image.size(0)

    @torch.no_grad()
    def rank(self, image, question, question_atts, answers, answer_atts, k):
        out = self.model(image, question, question_atts)
        n = question.size(0)
        start = answers[0, 0].repeat(n, 1)
        scores = self.answer_decoder(start, torch.ones(start.shape), out.multimodal_embeddings, question_atts)
        prob_first = scores[:, 0, :].softmax(1).index_select(1, answers[:, 1])
        topk_probs, topk_ids = prob_first.topk(k, dim=1)
        ids = torch.cat([answers.index_select(0, t) for t in topk_ids])
        atts = torch.cat([answer_atts.index_select(0, t) for t in topk_ids])
        targets = ids.masked_fill(ids == 0, -100)
        scores = self.answer_decoder(ids, atts, out.multimodal_embeddings.repeat_interleave(k, 0),
                                     question_atts.repeat_interleave(k, 0))
        nll = self.loss(targets, scores).view(ids.size(0), -1)
        log_probs = torch.cat([topk_probs.view(-1, 1).log(), -nll], dim=1).sum(1).view(n, k)
        probs, rerank = log_probs.softmax(-1).topk(k, dim=1)
        return torch.gather(topk_ids, 1, rerank), probs


def reference():
    torch.manual_seed(0)
    ve = ALBEFVisionEncoder(image_size=16, patch_size=8, num_hidden_layers=1, num_attention_heads=2, hidden_size=H,
                            mlp_dim=32)
    te = bert_text_encoder(hidden_size=H, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                           vocab_size=V, max_position_embeddings=12, dropout=0.0)
    ref = RefVQA(tmm_albef.ALBEFModel(ve, te, ALBEFMultimodalEncoder(H, 2, 2, 32)), RefDecoder())
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return ref


def data():
    g = torch.Generator().manual_seed(3)
    images = torch.randn(2, 3, 16, 16, generator=g)
    q = torch.tensor([[2, 9, 11, 3, 0], [2, 12, 13, 14, 3]])
    answers = torch.tensor([[2, 20, 3, 0], [2, 21, 22, 3], [2, 23, 3, 0], [2, 24, 3, 0], [2, 25, 26, 3]])
    return images, q, (q != 0).long(), answers, (answers != 0).long()


def test_vqa_loss_gradients_momentum_and_ranking_match():
    ref = reference()
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    params, state = from_torchmultimodal(sd, SPEC)
    images, q, qa, ans, aa = data()
    weights, lengths = torch.tensor([0.5, 0.5, 1.0, 0.7, 0.3]), [2, 3]
    loss_ref = ref.train_loss(images, q, qa, ans, aa, weights, lengths, 0.4)
    loss_ref.backward()
    leaves = {k: v.detach().requires_grad_() for k, v in pytree.flatten(params).items()}
    loss, new_state = SPEC(pytree.unflatten(leaves), images, q, qa, ans, aa, weights, torch.tensor(lengths), state,
                           alpha=0.4)
    loss.backward()
    torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=1e-5)
    full = {k: torch.zeros_like(v) for k, v in ref.state_dict().items()}
    full |= {k: p.grad for k, p in ref.named_parameters() if p.grad is not None}
    grads, _ = from_torchmultimodal(full, SPEC)
    for k, g in pytree.flatten(grads).items():
        torch.testing.assert_close(leaves[k].grad, g, atol=1e-5, rtol=1e-5, msg=k)
    _, ref_state = from_torchmultimodal(ref.state_dict(), SPEC)
    for k, v in pytree.flatten(ref_state).items():
        torch.testing.assert_close(pytree.flatten(new_state)[k], v, atol=1e-6, rtol=1e-5, msg=k)
    ids_ref, probs_ref = ref.rank(images, q, qa, ans, aa, k=3)
    ids, probs = SPEC.rank_answers(params, images, q, qa, ans, aa, k=3)
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(probs, probs_ref, atol=1e-5, rtol=1e-5)


def test_vqa_round_trip_and_strict_load():
    ref = reference()
    sd = ref.state_dict()
    back = to_torchmultimodal(*from_torchmultimodal(sd, SPEC), SPEC)
    assert sorted(back) == sorted(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    ref.load_state_dict(back, strict=True)


def test_vqa_bad_inputs_name_what_was_expected():
    params = SPEC.init(key=torch.tensor([0, 1]))
    state = SPEC.initial_state(params)
    images, q, qa, ans, aa = data()
    with pytest.raises(ValueError, match=r"questions \[1\] have no candidate answers"):
        SPEC(params, images, q, qa, ans[:2], aa[:2], torch.ones(2), torch.tensor([2, 0]), state)
    with pytest.raises(ValueError, match="non-empty candidate list"):
        SPEC.rank_answers(params, images, q, qa, ans[:0], aa[:0], k=1)
    with pytest.raises(ValueError, match="expected 2 texts"):
        SPEC.rank_answers(params, images, q[:1], qa[:1], ans, aa, k=1)


def test_generation_with_the_kv_cache_equals_recomputing_the_prefix():
    params = SPEC.init(key=torch.tensor([0, 3]))
    images, q, qa, _, _ = data()
    with_cache = SPEC.generate(params, images, q, qa, start_id=2, end_id=3, max_length=6)
    without = SPEC.generate(params, images, q, qa, start_id=2, end_id=3, max_length=6, use_cache=False)
    assert torch.equal(with_cache, without) and with_cache.shape[0] == 2 and (with_cache[:, 0] == 2).all()
    # the cached step's logits equal the full pass's last position (not just the argmax)
    qs = SPEC.model(params["model"], images, q, qa).multimodal_embeddings
    full = SPEC.decode(params, with_cache[:, :3], torch.ones_like(with_cache[:, :3]), qs, qa)
    layer, dec, caches = SPEC.decoder_layer(), params["answer_decoder"], [None, None]
    for t in range(3):
        x = SPEC.answer_decoder.embeddings(dec["embeddings"], with_cache[:, t:t + 1],
                                           position_ids=torch.full((2, 1), t))
        for i, p in enumerate(dec["encoder"]["layers"]):
            x, _, caches[i] = layer(p, x, qs, memory_key_padding_mask=~qa.bool(), cache=caches[i], use_cache=True)
        torch.testing.assert_close(SPEC.prediction_head(params["prediction_head"], x[:, -1]), full[:, t],
                                   atol=1e-5, rtol=1e-5)
