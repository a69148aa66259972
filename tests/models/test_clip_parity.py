"""CLIP parity with open_clip (= OpenAI's layout) and TorchMultimodal given copied weights, exact
round trips, parameter counts of every published configuration, and conversion errors."""

import logging

import pytest
import torch

from checks import assert_close
from polymodal.core import pytree
from polymodal.core import random as pr
from polymodal.models.clip import (
    BUILDERS, CLIP, ModifiedResNet, build, clip_text_transformer, clip_vision_transformer, config_from_open_clip,
    config_from_torchmultimodal, from_open_clip, from_torchmultimodal, to_open_clip, to_torchmultimodal,
)

open_clip = pytest.importorskip("open_clip")
logging.getLogger().setLevel(logging.ERROR)  # open_clip warns that no pretrained weights were loaded

ATOL = 1e-5  # embeddings are unit vectors; observed differences are ~1e-7


def _tokens(seed: int, b: int, t: int, vocab: int) -> torch.Tensor:
    ids = pr.randint(pr.key(seed), (b, t), 1, vocab - 1)
    eot = pr.randint(pr.key(seed + 1), (b,), 2, t)
    return ids.scatter(1, eot[:, None], vocab - 1)


def _oc_tiny(resnet: bool, quick_gelu: bool = True):
    vision = (dict(image_size=64, layers=[1, 2, 1, 1], width=8, head_width=128) if resnet
              else dict(image_size=16, layers=2, width=32, patch_size=4, head_width=16))
    text = dict(context_length=8, vocab_size=60, width=32, heads=2, layers=2)
    return open_clip.model.CLIP(24, vision, text, quick_gelu=quick_gelu)


def _our_tiny(resnet: bool, quick_gelu: bool = True) -> CLIP:
    act = "quick_gelu" if quick_gelu else "gelu"
    vision = (ModifiedResNet(image_size=64, layers=(1, 2, 1, 1), width=8, heads=2, embed_dim=24) if resnet
              else clip_vision_transformer(image_size=16, patch_size=4, width=32, layers=2, heads=2, activation=act,
                                           embed_dim=24))
    text = clip_text_transformer(context_length=8, vocab_size=60, width=32, heads=2, layers=2, activation=act,
                                 embed_dim=24)
    return CLIP(visual=vision, text=text)


def _train_bn(model: torch.nn.Module, size: int) -> None:
    """A few train-mode passes so the running statistics are not the initial ones."""
    model.train()
    with torch.no_grad():
        for i in range(2):
            model.encode_image(pr.normal(pr.key(100 + i), (2, 3, size, size)) * 2 + 0.5)
    model.eval()


def _clone(sd):
    return {k: v.clone() for k, v in sd.items()}  # our params alias the state dict's tensors


def test_open_clip_vit_b32_same_embeddings():
    torch.manual_seed(0)
    ref = open_clip.create_model("ViT-B-32", pretrained=None).eval()  # open_clip's ViT-B-32 uses GELU
    sd = _clone(ref.state_dict())
    spec = config_from_open_clip(sd, quick_gelu=False)
    assert spec == build("ViT-B-32") == build("clip_vit_b32", quick_gelu=False)
    params = from_open_clip(sd, quick_gelu=False)
    x, t = pr.normal(pr.key(0), (2, 3, 224, 224)), _tokens(1, 2, 77, 49408)
    with torch.no_grad():
        img, txt = ref.encode_image(x, normalize=True), ref.encode_text(t, normalize=True)
        out = spec(params, x, t)
    assert_close(out.image_embeddings, img, atol=ATOL, rtol=0)
    assert_close(out.text_embeddings, txt, atol=ATOL, rtol=0)
    assert float(out.logit_scale) == float(ref.logit_scale.detach())
    back = to_open_clip(params)
    assert sorted(back) == sorted(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


def test_open_clip_rn50_same_embeddings_with_batch_norm_statistics():
    torch.manual_seed(0)
    ref = open_clip.create_model("RN50", pretrained=None)
    _train_bn(ref, 224)
    sd = _clone(ref.state_dict())
    spec = build("RN50", quick_gelu=False)
    assert config_from_open_clip(sd, quick_gelu=False) == spec
    params, state = from_open_clip(sd, quick_gelu=False, with_state=True)
    assert int(state["visual"]["layer3"][5]["bn2"]["num_batches_tracked"]) == 2
    x, t = pr.normal(pr.key(0), (2, 3, 224, 224)), _tokens(1, 2, 77, 49408)
    with torch.no_grad():
        img, txt = ref.encode_image(x, normalize=True), ref.encode_text(t, normalize=True)
        out, same = spec(params, x, t, state)
    assert same is state
    assert_close(out.image_embeddings, img, atol=ATOL, rtol=0)
    assert_close(out.text_embeddings, txt, atol=ATOL, rtol=0)
    with pytest.warns(UserWarning, match="running statistics were dropped"):
        from_open_clip(sd, spec)
    back = to_open_clip(params, state)
    assert sorted(back) == sorted(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


@pytest.mark.parametrize("resnet", [False, True], ids=["vit", "resnet"])
def test_open_clip_tiny_quickgelu_and_train_mode_batch_norm(resnet):
    torch.manual_seed(0)
    ref = _oc_tiny(resnet)
    spec = _our_tiny(resnet)
    params, state = from_open_clip(_clone(ref.state_dict()), spec, with_state=True)
    size = spec.image_size
    x, t = pr.normal(pr.key(0), (4, 3, size, size)), _tokens(1, 4, 8, 60)
    ref.train()  # batch statistics in the ResNet; running statistics advance
    with torch.no_grad():
        img, txt = ref.encode_image(x, normalize=True), ref.encode_text(t, normalize=True)
    res = spec(params, x, t, state, training=True)
    out, new_state = res if resnet else (res, None)  # (out, state) only for stateful (ResNet) towers
    assert_close(out.image_embeddings, img, atol=ATOL, rtol=0)
    assert_close(out.text_embeddings, txt, atol=ATOL, rtol=0)
    if resnet:
        theirs = ref.state_dict()
        for k, v in to_open_clip(params, new_state).items():
            assert_close(v, theirs[k], atol=1e-6, rtol=1e-5, msg=k)
    fresh = _oc_tiny(resnet)
    fresh.load_state_dict(to_open_clip(params, state, spec), strict=True)


def test_torchmultimodal_vit_b32_same_embeddings_and_exact_round_trip():
    from torchmultimodal.models.clip.model import clip_vit_b32

    torch.manual_seed(0)
    ref = clip_vit_b32().eval()
    sd = _clone(ref.state_dict())
    spec = config_from_torchmultimodal(sd)
    assert spec == build("clip_vit_b32")  # TorchMultimodal's CLIP uses QuickGELU (its "SiLU")
    params = from_torchmultimodal(sd)
    x, t = pr.normal(pr.key(0), (2, 3, 224, 224)), _tokens(1, 2, 77, 49408)
    with torch.no_grad():
        theirs = ref(x, t)
        ours = spec(params, x, t)
    assert_close(ours.image_embeddings, theirs.embeddings_a, atol=ATOL, rtol=0)
    assert_close(ours.text_embeddings, theirs.embeddings_b, atol=ATOL, rtol=0)
    back = to_torchmultimodal(params)
    assert sorted(back) == sorted(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


def test_torchmultimodal_resnet_same_embeddings_and_exact_round_trip():
    from torchmultimodal.models.clip.image_encoder import ResNetForCLIP
    from torchmultimodal.models.clip.model import CLIP as TMMCLIP
    from torchmultimodal.models.clip.model import clip_rn50
    from torchmultimodal.models.clip.text_encoder import CLIPTextEncoder

    torch.manual_seed(0)
    ref = TMMCLIP(ResNetForCLIP((1, 2, 1, 1), output_dim=24, heads=2, input_resolution=64, width=8),
                  CLIPTextEncoder(embedding_dim=24, context_length=8, vocab_size=60, width=32, dim_feedforward=128,
                                  heads=2, layers=2))
    _train_bn(_Enc(ref.encoder_a), 64)
    spec = _our_tiny(True)
    params, state = from_torchmultimodal(_clone(ref.state_dict()), spec, with_state=True)
    x, t = pr.normal(pr.key(0), (2, 3, 64, 64)), _tokens(1, 2, 8, 60)
    with torch.no_grad():
        theirs = ref.eval()(x, t)
    ours, _ = spec(params, x, t, state)
    assert_close(ours.image_embeddings, theirs.embeddings_a, atol=ATOL, rtol=0)
    assert_close(ours.text_embeddings, theirs.embeddings_b, atol=ATOL, rtol=0)
    sd = clip_rn50().state_dict()
    p, s = from_torchmultimodal(sd, with_state=True)
    back = to_torchmultimodal(p, s)
    assert sorted(back) == sorted(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


class _Enc(torch.nn.Module):
    def __init__(self, visual):
        super().__init__()
        self.visual = visual

    def encode_image(self, x):
        return self.visual(x)


@pytest.fixture
def shapes_only(monkeypatch):
    """Initialise on the meta device without the cost of the random bit generator (values unused)."""
    monkeypatch.setattr(pr, "_hash", lambda k, c: k[..., 0].reshape(k.shape[:-1] + (1,) * c.dim()) ^ c)


OPEN_CLIP_NAMES = {
    "clip_vit_b32": "ViT-B-32", "clip_vit_b16": "ViT-B-16", "clip_vit_l14": "ViT-L-14", "clip_vit_l14_336": "ViT-L-14-336",
    "clip_rn50": "RN50", "clip_rn101": "RN101", "clip_rn50x4": "RN50x4", "clip_rn50x16": "RN50x16",
    "clip_rn50x64": "RN50x64",
}


def test_every_published_builder_is_counted():
    assert set(OPEN_CLIP_NAMES) == set(BUILDERS) - {"clip_tiny", "clip_tiny_rn", "clip_small"}


@pytest.mark.parametrize("name", sorted(OPEN_CLIP_NAMES))
def test_parameter_counts_equal_open_clip_and_torchmultimodal(name, shapes_only):
    import torchmultimodal.models.clip.model as tmm

    oc_name = OPEN_CLIP_NAMES[name]
    with torch.device("meta"):
        ours = pytree.num_params(build(name).init(key=pr.key(0)))
        ref = open_clip.create_model(oc_name, pretrained=None, device="meta")
        theirs = sum(p.numel() for p in ref.parameters())
        assert ours == theirs, f"{name}: {ours} vs open_clip {oc_name} {theirs}"
        if hasattr(tmm, name):  # TorchMultimodal has no ViT-L/14@336px; its CLIP keeps no logit scale
            assert ours == sum(p.numel() for p in getattr(tmm, name)().parameters()) + 1


def test_conversion_errors_name_the_keys():
    spec = _our_tiny(False)
    sd = to_open_clip(spec.init(key=pr.key(0)))
    bad = dict(sd, **{"visual.transformer.resblocks.0.ls_1.gamma": torch.ones(32), "extra.weight": torch.ones(1)})
    with pytest.raises(ValueError, match=r"unexpected keys \(2\).*extra\.weight, visual\.transformer\.resblocks\.0\.ls_1"):
        from_open_clip(bad, spec)
    missing = {k: v for k, v in sd.items() if k not in ("ln_final.bias", "visual.proj")}
    with pytest.raises(ValueError, match=r"missing keys \(2\): ln_final\.bias, visual\.proj"):
        from_open_clip(missing, spec)
    wrong = dict(sd, text_projection=torch.zeros(32, 25))
    with pytest.raises(ValueError, match=r"text_projection: expected \(32, 24\), got \(32, 25\)"):
        from_open_clip(wrong, spec)
    tmm = to_torchmultimodal(spec.init(key=pr.key(0)))
    with pytest.raises(ValueError, match=r"missing keys \(1\): encoder_b\.projection\.weight"):
        from_torchmultimodal({k: v for k, v in tmm.items() if k != "encoder_b.projection.weight"}, spec)
    with pytest.raises(ValueError, match="cannot infer the CLIP architecture"):
        from_open_clip({"logit_scale": torch.zeros(())})


@pytest.mark.parametrize("resnet", [False, True])
def test_both_layouts_round_trip_exactly_both_ways(resnet):
    spec = _our_tiny(resnet)
    params = spec.init(key=pr.key(3))
    state = spec.init_state()
    if state is not None:  # non-initial statistics, so state is not just regenerated
        state = pytree.tree_map(lambda t: t + 3 if t.is_floating_point() else t + 2, state)
    for to, back in ((to_open_clip, from_open_clip), (to_torchmultimodal, from_torchmultimodal)):
        sd = to(params, state, spec)
        p2, s2 = back(sd, spec, with_state=True)  # TorchMultimodal's missing logit_scale: the spec's initial one
        assert_close(p2, params, atol=0, rtol=0, msg=to.__name__)
        assert (s2 is None) == (state is None)
        if state is not None:
            assert_close(s2, state, atol=0, rtol=0, msg=to.__name__)
        again = to(p2, s2, spec)
        assert list(again) == list(sd) and all(torch.equal(again[k], sd[k]) for k in sd), to.__name__
