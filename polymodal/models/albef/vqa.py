"""``ALBEFForVQA``: ALBEF's encoders plus an answer decoder that ranks candidate answers
(TorchMultimodal ``examples/albef/model.py``'s ``ALBEFModelForVQA`` / ``ALBEFDecoder``).

The question and image are fused by the multimodal encoder; the answer decoder (BERT text embeddings
and causal layers cross-attending to those fused question states, then a :class:`PredictionHead`)
scores answers token by token. Training is the causal LM loss with momentum distillation from the
momentum copies (explicit state, as :class:`~.retrieval.ALBEFForRetrieval`); inference scores the
first token of every candidate, keeps the top ``k`` and re-ranks them by their full log-likelihood
(:meth:`rank_answers`), or decodes an answer freely, greedily, with a KV cache (:meth:`generate`).

Params ``model``, ``answer_decoder`` (a :class:`BERTTextEncoder`), ``prediction_head``;
state ``{"momentum": copies of all three}``.

>>> import torch
>>> from polymodal.core import random as pr
>>> from polymodal.models.albef.builders import albef_vqa_tiny
>>> spec = albef_vqa_tiny()
>>> p = spec.init(key=pr.key(0))
>>> answers = torch.tensor([[2, 5, 3], [2, 6, 3], [2, 7, 3]])
>>> ids, probs = spec.rank_answers(p, torch.randn(2, 3, 32, 32), torch.tensor([[2, 9, 3], [2, 8, 3]]), None,
...                                answers, None, k=2)
>>> ids.shape, probs.shape
(torch.Size([2, 2]), torch.Size([2, 2]))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ...core import random as pr
from ...core.encoders.bert import BERTTextEncoder
from ...core.layers.transformer_layer import TransformerDecoderLayer
from ...core.pytree import Params
from ...core.spec import Spec
from .heads import PredictionHead
from .losses import clm_loss
from .model import ALBEFModel, check_pair
from .momentum import copy_momentum, momentum_update

__all__ = ["ALBEFForVQA"]


@dataclass(frozen=True)
class ALBEFForVQA(Spec):
    """``__call__(params, images, question_ids, question_mask, answer_ids, answer_mask, answer_weights,
    answer_counts, state, *, alpha=0.4, key=None) -> (loss, new_state)``; :meth:`rank_answers` for inference."""

    model: ALBEFModel  # image + question -> fused question states
    answer_decoder: BERTTextEncoder  # causal layers cross-attending to the fused question states
    prediction_head: PredictionHead  # decoder states -> vocabulary scores
    momentum: float = 0.995  # EMA rate of the momentum copies

    def __post_init__(self) -> None:
        if not self.answer_decoder.encoder.layer.is_causal:
            raise ValueError("ALBEFForVQA: answer_decoder: expected causal self-attention (layer.is_causal=True)")

    @property
    def pad_token_id(self) -> int:
        return self.answer_decoder.embeddings.pad_token_id

    def init(self, *, key: Tensor) -> Params:
        km, kd, kh = pr.split(key, 3)
        return {"model": self.model.init(key=km), "answer_decoder": self.answer_decoder.init(key=kd),
                "prediction_head": self.prediction_head.init(key=kh)}

    def initial_state(self, params: Params, *, key: Tensor | None = None) -> Params:
        """Momentum copies of every subtree (``key`` unused: no queues)."""
        return {"momentum": copy_momentum(params)}

    def decode(self, params: Params, answer_ids: Tensor, answer_mask: Tensor | None, question_states: Tensor,
               question_mask: Tensor | None, *, key: Tensor | None = None) -> Tensor:
        """``answers (N, M)``, fused ``question_states (N, L, D)`` -> scores ``(N, M, V)``."""
        h = self.answer_decoder(params["answer_decoder"], answer_ids, answer_mask,
                                encoder_hidden_states=question_states, encoder_attention_mask=question_mask,
                                key=key).last_hidden_state
        return self.prediction_head(params["prediction_head"], h)

    def _question(self, params: Params, images: Tensor, ids: Tensor, mask: Tensor, key: Tensor | None) -> Tensor:
        return self.model(params["model"], images, ids, mask, key=key).multimodal_embeddings

    def _masks(self, ids: Tensor, mask: Tensor | None) -> Tensor:
        return (ids != self.pad_token_id).long() if mask is None else mask

    def __call__(self, params: Params, images: Tensor, question_ids: Tensor, question_mask: Tensor | None,
                 answer_ids: Tensor, answer_mask: Tensor | None, answer_weights: Tensor, answer_counts: Tensor,
                 state: Params, *, alpha: float = 0.4, key: Tensor | None = None) -> tuple[Tensor, Params]:
        """The VQA training loss: ``sum(weights * clm_loss) / B`` (TorchMultimodal's ``_train_forward``).

        Args:
            answer_ids, answer_mask: ``(N, M)``, all questions' answers one after another (``[CLS] ... [SEP]``).
            answer_weights: ``(N,)``. answer_counts: ``(B,)`` answers per question (sum ``N``, each >= 1).
        """
        check_pair("ALBEFForVQA", images, question_ids, question_mask)
        counts = torch.as_tensor(answer_counts, device=images.device).long().reshape(-1)
        b, n = images.shape[0], answer_ids.shape[0]
        if counts.shape[0] != b:
            raise ValueError(f"ALBEFForVQA: answer_counts: expected {b} counts (one per question), got "
                             f"{counts.shape[0]}")
        if answer_weights.reshape(-1).shape[0] != n:
            raise ValueError(f"ALBEFForVQA: answer_weights: expected {n} weights (one per answer), got "
                             f"{answer_weights.reshape(-1).shape[0]}")
        if not torch.compiler.is_compiling():
            if bool((counts < 1).any()):
                bad = torch.nonzero(counts < 1).flatten().tolist()
                raise ValueError(f"ALBEFForVQA: questions {bad} have no candidate answers; expected at least one "
                                 "answer per question")
            if int(counts.sum()) != n:
                raise ValueError(f"ALBEFForVQA: answer_counts sum to {int(counts.sum())}, expected {n} (the rows of "
                                 "answer_ids)")
        q_mask = self._masks(question_ids, question_mask)
        a_mask = self._masks(answer_ids, answer_mask)
        kq, kd = pr.maybe_split(key, 2)
        mp = momentum_update(state["momentum"], params, self.momentum)
        q = self._question(params, images, question_ids, q_mask, kq)
        rep = lambda t: torch.repeat_interleave(t, counts, dim=0)  # noqa: E731
        q_states, q_att = rep(q), rep(q_mask)
        scores_m = None
        if alpha:
            with torch.no_grad():
                q_m = self._question(mp, images, question_ids, q_mask, None)
                scores_m = self.decode(mp, answer_ids, a_mask, rep(q_m), q_att)
        scores = self.decode(params, answer_ids, a_mask, q_states, q_att, key=kd)
        labels = answer_ids.masked_fill(answer_ids == self.pad_token_id, -100)
        loss = clm_loss(labels, scores, scores_m, alpha)
        return (answer_weights.reshape(-1) * loss).sum() / b, {**state, "momentum": mp}

    @torch.no_grad()
    def rank_answers(self, params: Params, images: Tensor, question_ids: Tensor, question_mask: Tensor | None,
                     answer_ids: Tensor, answer_mask: Tensor | None, k: int = 128) -> tuple[Tensor, Tensor]:
        """The top ``k`` candidate answers of each question and their probabilities ``(B, k)``, best first
        (TorchMultimodal's ``_eval_forward``: first-token probabilities pick ``k`` candidates, whose full
        log-likelihoods re-rank them).

        Args:
            answer_ids, answer_mask: ``(A, M)`` the candidate list, each ``[CLS] answer [SEP]`` (padded).
        """
        check_pair("ALBEFForVQA", images, question_ids, question_mask)
        a = answer_ids.shape[0]
        if answer_ids.dim() != 2 or a == 0 or answer_ids.shape[1] < 2:
            raise ValueError(f"ALBEFForVQA.rank_answers: answer_ids: expected a non-empty candidate list (A >= 1, "
                             f"M >= 2 tokens: [CLS] answer ...), got shape {tuple(answer_ids.shape)}")
        if not 1 <= k <= a:
            raise ValueError(f"ALBEFForVQA.rank_answers: k: expected 1 <= k <= {a} (the candidates), got {k}")
        q_mask = self._masks(question_ids, question_mask)
        a_mask = self._masks(answer_ids, answer_mask)
        b = images.shape[0]
        q = self._question(params, images, question_ids, q_mask, None)
        start = answer_ids[:1, :1].expand(b, 1)
        first = self.decode(params, start, torch.ones_like(start), q, q_mask)[:, 0, :]
        prob_first = F.softmax(first, dim=1).index_select(1, answer_ids[:, 1])
        topk_probs, topk_ids = prob_first.topk(k, dim=1)
        ids = answer_ids[topk_ids.reshape(-1)]
        att = a_mask[topk_ids.reshape(-1)]
        targets = ids.masked_fill(ids == self.pad_token_id, -100)
        scores = self.decode(params, ids, att, q.repeat_interleave(k, 0), q_mask.repeat_interleave(k, 0))
        nll = clm_loss(targets, scores).view(b, k)
        log_probs = topk_probs.log() - nll
        probs = F.softmax(log_probs, dim=-1)
        probs, order = probs.topk(k, dim=1)
        return torch.gather(topk_ids, 1, order), probs

    def decoder_layer(self) -> TransformerDecoderLayer:
        """The answer decoder's block as a :class:`TransformerDecoderLayer` (causal self-attention,
        cross-attention, feed-forward; torch's decoder-layer names, so the same params) for cached decoding."""
        lay = self.answer_decoder.encoder.layer
        return TransformerDecoderLayer(lay.d_model, lay.num_heads, lay.dim_feedforward, lay.dropout, lay.attn_dropout,
                                       lay.activation, lay.norm_first, lay.layer_norm_eps, lay.fp32_norm, 0.0,
                                       lay.bias, lay.weight_init, cross_attention=True, dim_kv=lay.dim_kv,
                                       is_causal=True)

    @torch.no_grad()
    def generate(self, params: Params, images: Tensor, question_ids: Tensor, question_mask: Tensor | None, *,
                 start_id: int, end_id: int, max_length: int = 8, use_cache: bool = True) -> Tensor:
        """Greedy free-form answers ``(B, L <= max_length)`` starting with ``start_id`` ([CLS]); after
        ``end_id`` ([SEP]) a row continues with padding. With ``use_cache`` each step feeds one new token
        through the layers with their KV caches (self-attention appended, cross-attention reused);
        without, every step re-runs the whole prefix (the same ids)."""
        check_pair("ALBEFForVQA", images, question_ids, question_mask)
        q_mask = self._masks(question_ids, question_mask)
        q = self._question(params, images, question_ids, q_mask, None)
        b = images.shape[0]
        ids = question_ids.new_full((b, 1), start_id)
        done = torch.zeros(b, dtype=torch.bool, device=ids.device)
        layer, dec = self.decoder_layer(), params["answer_decoder"]
        caches: list = [None] * self.answer_decoder.encoder.num_layers
        for t in range(max_length - 1):
            if use_cache:
                pos = ids.new_full((b, 1), t)
                x = self.answer_decoder.embeddings(dec["embeddings"], ids[:, -1:], position_ids=pos)
                for i, p in enumerate(dec["encoder"]["layers"]):
                    x, _, caches[i] = layer(p, x, q, memory_key_padding_mask=~q_mask.bool(), cache=caches[i],
                                            use_cache=True)
                logits = self.prediction_head(params["prediction_head"], x[:, -1])
            else:
                logits = self.decode(params, ids, torch.ones_like(ids), q, q_mask)[:, -1]
            nxt = logits.argmax(-1).masked_fill(done, self.pad_token_id)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            done = done | (nxt == end_id)
            if not torch.compiler.is_compiling() and bool(done.all()):
                break
        return ids
