"""Parity with randomly initialised TorchMultimodal ALBEF given the same weights, state and negatives.

The reference retrieval model is a minimal copy of ``ALBEFModelForRetrieval._train_forward`` from
TorchMultimodal's ``examples/albef/model.py`` (not installed), composed from the installed package's
``ALBEFVisionEncoder``, ``bert_text_encoder``, ``ALBEFMultimodalEncoder``, ``ALBEFModel``,
``ALBEFModelWithSimilarity`` and ``ImageTextContrastiveLoss``. Its hard negatives come from
``torch.multinomial``: the test records them and hands the same indices to polymodal.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from polymodal.core import pytree
from polymodal.models.albef.builders import albef_retrieval
from polymodal.models.albef.convert import from_torchmultimodal, to_torchmultimodal

tmm_albef = pytest.importorskip("torchmultimodal.models.albef.model")
from torchmultimodal.models.albef.image_encoder import ALBEFVisionEncoder  # noqa: E402
from torchmultimodal.models.albef.multimodal_encoder import ALBEFMultimodalEncoder  # noqa: E402
from torchmultimodal.modules.encoders.bert_text_encoder import bert_text_encoder  # noqa: E402
from torchmultimodal.modules.losses.albef import ImageTextContrastiveLoss  # noqa: E402

H, B, Q, E, V = 16, 4, 8, 8, 40
CFG = dict(image_size=16, patch_size=8, vision_width=H, vision_layers=2, vision_heads=2, vision_mlp=32, vocab_size=V,
           hidden_size=H, text_layers=2, multimodal_layers=2, num_heads=2, intermediate_size=32,
           max_position_embeddings=12)


class RefRetrieval(nn.Module):
    """``examples/albef/model.py``: ``ALBEFModelForRetrieval`` (training forward only)."""

    def __init__(self, model_with_similarity, hidden_size):
        super().__init__()
        self.model_with_similarity = model_with_similarity
        self.itc_loss = ImageTextContrastiveLoss()
        self.itm_head = nn.Linear(hidden_size, 2)

    def forward(self, image, text, text_atts, idx, alpha):
        out = self.model_with_similarity(image, text, text_atts, idx)
        s = out.similarity
        itc = self.itc_loss(s.sim_i2t, s.sim_t2i, s.sim_i2t_m, s.sim_t2i_m, out.sim_targets, alpha)
        vl = torch.cat([out.multimodal_embeddings[:, 0, :], out.multimodal_embeddings_neg[:, 0, :]], dim=0)
        logits = self.itm_head(vl)
        labels = torch.cat([torch.ones(B, dtype=torch.long), torch.zeros(2 * B, dtype=torch.long)])
        itm = F.cross_entropy(logits, labels)
        return itc + itm, itc, itm, s, logits


def reference():
    torch.manual_seed(0)
    ve = ALBEFVisionEncoder(image_size=16, patch_size=8, num_hidden_layers=2, num_attention_heads=2, hidden_size=H,
                            mlp_dim=32)
    te = bert_text_encoder(hidden_size=H, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                           vocab_size=V, max_position_embeddings=12, dropout=0.0)
    me = ALBEFMultimodalEncoder(hidden_size=H, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    m = tmm_albef.ALBEFModel(ve, te, me)
    ms = tmm_albef.ALBEFModelWithSimilarity(m, nn.Linear(H, E), nn.Linear(H, E), embed_size=E, queue_size=Q)
    ref = RefRetrieval(ms, H)
    with torch.no_grad():  # the copies start equal; make them differ so the momentum update shows
        for n, p in ref.named_parameters():
            p.add_(0.01 * torch.randn_like(p))
    return ref


def inputs(step):
    g = torch.Generator().manual_seed(10 + step)
    images = torch.randn(B, 3, 16, 16, generator=g)
    ids = torch.randint(5, V, (B, 7), generator=g)
    ids[:, 0] = 2
    atts = torch.ones(B, 7, dtype=torch.long)
    atts[1, 5:] = 0
    atts[3, 4:] = 0
    ids = ids * atts
    idx = torch.tensor([0, 1, 2, 1]) + 4 * step  # a repeated id: two positives in the targets
    return images, ids, atts, idx


def run_reference(ref, step):
    images, ids, atts, idx = inputs(step)
    drawn = []
    real = torch.multinomial

    def record(*a, **k):
        out = real(*a, **k)
        drawn.append(out)
        return out

    torch.multinomial = record
    try:
        out = ref(images, ids, atts, idx, 0.4)
    finally:
        torch.multinomial = real
    negs = torch.cat(drawn).reshape(2, B)  # images for each text, then texts for each image
    return out, negs


def ref_params(ref):  # cloned: the reference writes its queues in place
    return from_torchmultimodal({k: v.clone() for k, v in ref.state_dict().items()}, SPEC)


SPEC = albef_retrieval(embed_size=E, queue_size=Q, negatives_by_idx=False, **CFG)


def ours_step(params, state, step, negs):
    images, ids, atts, idx = inputs(step)
    leaves = {k: v.detach().requires_grad_(v.is_floating_point()) for k, v in pytree.flatten(params).items()}
    out, new_state = SPEC(pytree.unflatten(leaves), images, ids, atts, idx, state, alpha=0.4,
                          neg_indices=(negs[0], negs[1]))
    out.loss.backward()
    return out, new_state, {k: v.grad for k, v in leaves.items()}


def close(a, b, what, atol=1e-5):
    assert a.shape == b.shape, what
    torch.testing.assert_close(a, b, atol=atol, rtol=1e-5, msg=what)


def test_encoders_match():
    ref = reference()
    params, _ = ref_params(ref)
    images, ids, atts, _ = inputs(0)
    am = ref.model_with_similarity.albef_model
    with torch.no_grad():
        close(SPEC.model.encode_image(params["model"], images), am.vision_encoder(images), "image embeddings")
        txt = am.text_encoder(ids, atts).last_hidden_state
        close(SPEC.model.encode_text(params["model"], ids, atts), txt, "text embeddings")
        img = am.vision_encoder(images)
        ours = SPEC.model(params["model"], images, ids, atts)
        close(ours.multimodal_embeddings, am.multimodal_encoder(txt, atts, img), "multimodal embeddings")


def test_training_steps_match_losses_gradients_momentum_and_queues():
    ref = reference()
    params, state = ref_params(ref)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.5)
    for step in range(2):
        (loss, itc, itm, sim, logits), negs = run_reference(ref, step)
        opt_ref.zero_grad()
        loss.backward()
        out, state, grads = ours_step(params, state, step, negs)
        close(out.sim_i2t, sim.sim_i2t.detach(), "sim_i2t")
        close(out.sim_t2i, sim.sim_t2i.detach(), "sim_t2i")
        close(out.sim_i2t_m, sim.sim_i2t_m, "sim_i2t_m")
        close(out.itm_logits, logits.detach(), "ITM logits")
        close(out.itc_loss, itc.detach(), "ITC loss")
        close(out.itm_loss, itm.detach(), "ITM loss")
        # gradients: TorchMultimodal's .grad of each trainable parameter, converted to our names
        full = {k: torch.zeros_like(v) for k, v in ref.state_dict().items()}
        full |= {k: p.grad for k, p in ref.named_parameters() if p.grad is not None}
        ref_grads, _ = from_torchmultimodal(full, SPEC)
        for k, g in pytree.flatten(ref_grads).items():
            close(grads[k], g, f"grad {k}")
        # the state after the step: momentum copies and queues
        _, ref_state = ref_params(ref)
        for k, v in pytree.flatten(ref_state).items():
            got = pytree.flatten(state)[k]
            if v.is_floating_point():
                close(got, v, f"state {k}")
            else:
                assert torch.equal(got, v), k
        opt_ref.step()
        with torch.no_grad():
            params = pytree.unflatten({k: v.detach() - 0.5 * grads[k] for k, v in pytree.flatten(params).items()})


def test_round_trip_is_exact_and_loads_strictly():
    ref = reference()
    sd = ref.state_dict()
    params, state = from_torchmultimodal(sd, SPEC)
    back = to_torchmultimodal(params, state, SPEC)
    assert sorted(back) == sorted(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    ref.load_state_dict(back, strict=True)


def test_bad_state_dict_names_the_keys():
    sd = reference().state_dict()
    sd.pop("model_with_similarity.image_queue")
    with pytest.raises(ValueError, match="image_queue"):
        from_torchmultimodal(sd, SPEC)
