"""VideoCLIP against TorchMultimodal's, composed as in ``examples/mugen/retrieval/video_clip.py``
(not installed: the minimal copy below keeps its TextEncoder / VideoEncoder / Projection and its
``CLIP(encoder_a=text, encoder_b=video)`` composition, from the installed CLIP, torchvision's S3D
and transformers' DistilBERT). Weights go reference -> ours through ``from_torchmultimodal``."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import grad
from torchmultimodal.models.clip.model import CLIP
from torchmultimodal.modules.losses.contrastive_loss_with_temperature import ContrastiveLossWithTemperature
from torchvision.models.video import S3D
from transformers import DistilBertConfig, DistilBertModel

from polymodal.core.encoders.bert import bert_text_encoder
from polymodal.core.encoders.s3d import s3d
from polymodal.core.pytree import flatten
from polymodal.models.mugen.videoclip import VideoCLIP
from polymodal.models.mugen.videoclip_builders import videoclip
from polymodal.models.mugen.videoclip_convert import from_torchmultimodal, to_torchmultimodal

ATOL, RTOL = 1e-5, 1e-5


# --- examples/mugen/retrieval/video_clip.py (minimal copy) ----------------------------------------
class TextEncoder(nn.Module):
    def __init__(self, model_config=None, padding_value=0):
        super().__init__()
        self.padding_value = padding_value
        self.model = DistilBertModel(config=DistilBertConfig(**model_config) if model_config else DistilBertConfig())

    def forward(self, input_ids):
        mask = (input_ids != self.padding_value).to(dtype=int)
        return self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state[:, 0, :]


class VideoEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = S3D()
        self.model.classifier = nn.Identity()

    def forward(self, x):
        return self.model(x)


class Projection(nn.Module):
    def __init__(self, in_dim, out_dim=256, dropout_prob=0.1):
        super().__init__()
        self.linear1 = nn.Linear(in_dim, out_dim, bias=False)
        self.gelu = nn.GELU()
        self.linear2 = nn.Linear(out_dim, out_dim, bias=False)
        self.drop = nn.Dropout(dropout_prob)
        self.layer_norm = nn.LayerNorm(out_dim)

    def forward(self, x):
        embed1 = self.linear1(x)
        return self.layer_norm(embed1 + self.drop(self.linear2(self.gelu(embed1))))


def reference_videoclip(text_model_config=None, proj_out_dim=256, proj_dropout=0.1) -> CLIP:
    text = TextEncoder(text_model_config)
    video = VideoEncoder()
    return CLIP(encoder_a=nn.Sequential(text, Projection(text.model.config.dim, proj_out_dim, proj_dropout)),
                encoder_b=nn.Sequential(video, Projection(1024, proj_out_dim, proj_dropout)))
# ---------------------------------------------------------------------------------------------------

_SMALL_TEXT = dict(vocab_size=64, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=16,
                   dropout=0.0, attention_dropout=0.0)


def _small_pair(seed: int = 0):
    """The reference with a small DistilBERT and the full S3D whose 2x7x7 head pool is 1x1x1 (so an
    8-frame 32x32 clip goes through), and our matching spec, with the reference's weights."""
    torch.manual_seed(seed)
    ref = reference_videoclip(_SMALL_TEXT, proj_out_dim=16, proj_dropout=0.0)
    ref.encoder_b[0].model.avgpool = nn.AvgPool3d((1, 1, 1), stride=1)
    for m in ref.modules():  # non-trivial statistics and affine parameters
        if isinstance(m, (nn.BatchNorm3d, nn.LayerNorm)):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
        if isinstance(m, nn.BatchNorm3d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    text = bert_text_encoder(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                             max_position_embeddings=16, type_vocab_size=0, pooler=False)
    spec = VideoCLIP(text, s3d(pool_kernel=(1, 1, 1)), proj_dim=16, proj_dropout=0.0)
    # copies: from_torchmultimodal shares the tensors, and the reference advances its buffers in place
    params, state = from_torchmultimodal({k: v.clone() for k, v in ref.state_dict().items()}, spec)
    return ref, spec, params, state


def _inputs(b: int = 3):
    g = torch.Generator().manual_seed(7)
    video = torch.rand(b, 3, 8, 32, 32, generator=g)
    ids = torch.randint(1, 64, (b, 9), generator=g)
    ids[1, 5:] = 0  # padded rows
    ids[2, 3:] = 0
    return video, ids


@pytest.mark.parametrize("training", [False, True])
def test_embeddings_loss_and_gradients_match_reference(training):
    ref, spec, params, state = _small_pair()
    video, ids = _inputs()
    ref_loss_fn = ContrastiveLossWithTemperature(logit_scale=0.07, logit_scale_min=None, logit_scale_max=100)
    ref.train(training)
    out = ref(ids, video)
    ref_loss = ref_loss_fn(out.embeddings_a, out.embeddings_b)
    ref_loss.backward()

    ours, new_state = spec(params, video, ids, state, training=training)
    torch.testing.assert_close(ours.text_embeddings, out.embeddings_a, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(ours.video_embeddings, out.embeddings_b, atol=ATOL, rtol=RTOL)
    loss = spec.loss(params, ours).loss
    torch.testing.assert_close(loss, ref_loss, atol=ATOL, rtol=RTOL)
    # the advanced batch-norm statistics (training) or the same ones (eval)
    ref_sd = ref.state_dict()
    for k, v in to_torchmultimodal(params, new_state, spec=spec).items():
        torch.testing.assert_close(v, ref_sd[k], atol=1e-6, rtol=1e-5, msg=k)

    g = grad(lambda p: spec.loss(p, spec(p, video, ids, state, training=training)[0]).loss)(params)
    g_ref = {k: p.grad for k, p in ref.named_parameters()}
    for k, v in to_torchmultimodal(g, state, spec=spec).items():
        if k in g_ref:
            want = g_ref[k] if g_ref[k] is not None else torch.zeros_like(v)
            torch.testing.assert_close(v, want, atol=1e-5, rtol=1e-4, msg=k)
    torch.testing.assert_close(g["logit_scale"], ref_loss_fn.logit_scale.grad, atol=ATOL, rtol=RTOL)


def test_converter_round_trip_is_exact_and_strict():
    ref, spec, params, state = _small_pair(1)
    sd = ref.state_dict()
    back = to_torchmultimodal(params, state, spec=spec)
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert torch.equal(back[k], v), k
    fresh = reference_videoclip(_SMALL_TEXT, proj_out_dim=16, proj_dropout=0.0)
    fresh.load_state_dict(back, strict=True)
    # the Lightning layout carries the temperature
    lit = to_torchmultimodal(params, state, spec=spec, lightning=True)
    assert float(lit["contrastive_loss.logit_scale"]) == pytest.approx(0.07)
    p2, s2 = from_torchmultimodal(lit | {"contrastive_loss.logit_scale": torch.tensor(1.5)}, spec)
    assert float(p2["logit_scale"]) == 1.5
    assert all(torch.equal(a, b) for a, b in zip(flatten(s2).values(), flatten(state).values()))


def test_converter_names_bad_keys():
    ref, spec, params, state = _small_pair(2)
    sd = dict(ref.state_dict())
    sd.pop("encoder_b.1.linear1.weight")
    sd["encoder_a.1.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing keys \(1\): encoder_b.1.linear1.weight"):
        from_torchmultimodal(sd, spec)


def test_mugen_builder_matches_reference_layout():
    """``videoclip()`` has the keys and shapes of TorchMultimodal's ``videoclip(text_pretrained=False,
    video_pretrained=False)`` (compared on the meta device: no weights are drawn)."""
    with torch.device("meta"):
        ref = reference_videoclip()
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    from polymodal.models.mugen.videoclip_convert import torchmultimodal_table
    assert torchmultimodal_table().expected(videoclip()) == want
    assert sum(p.numel() for p in ref.parameters()) + 1 == 74_863_777  # + the loss's logit_scale


@pytest.mark.slow
def test_full_size_parity():
    """MUGEN's full configuration (DistilBERT-base, S3D with its 2x7x7 pool) on 16-frame 224x224 clips."""
    torch.manual_seed(0)
    ref = reference_videoclip(dict(dropout=0.0, attention_dropout=0.0)).eval()
    spec = videoclip(proj_dropout=0.0)
    params, state = from_torchmultimodal(ref.state_dict(), spec)
    video, ids = torch.rand(2, 3, 16, 224, 224), torch.randint(1, 30522, (2, 12))
    with torch.no_grad():
        out = ref(ids, video)
        ours, _ = spec(params, video, ids, state)
    torch.testing.assert_close(ours.text_embeddings, out.embeddings_a, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(ours.video_embeddings, out.embeddings_b, atol=ATOL, rtol=RTOL)
    assert math.isfinite(float(spec.loss(params, ours).loss))
