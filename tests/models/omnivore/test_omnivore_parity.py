"""Omnivore vs TorchMultimodal's ``Omnivore`` (random init, weights copied): same outputs for images,
videos and RGB-D, same gradients; exact conversion both ways; the reference loads ours strictly."""

import pytest
import torch
from torch import nn
from torchmultimodal.models import omnivore as tmm
from torchmultimodal.modules.encoders.swin_transformer_3d_encoder import SwinTransformer3d

from checks import randomize
from polymodal.core import random as pr
from polymodal.core.layers import linear_kernel as lk
from polymodal.core.pytree import flatten
from polymodal.models.omnivore import from_torchmultimodal, infer_spec, merge_published, to_torchmultimodal
from polymodal.models.omnivore.builders import omnivore, omnivore_encoder

TOL = dict(rtol=1e-5, atol=1e-5)
CFG = dict(patch_size=(2, 4, 4), embed_dim=8, depths=(2, 2), num_heads=(1, 2), window_size=(2, 3, 3))


def reference(seed=0, window=(2, 3, 3)):
    """TorchMultimodal's omnivore_swin_t recipe (``models/omnivore.py``) at a small size."""
    torch.manual_seed(seed)
    enc = SwinTransformer3d(patch_size=[2, 4, 4], embed_dim=8, depths=[2, 2], num_heads=[1, 2],
                            window_size=list(window), stochastic_depth_prob=0.2, norm_layer=nn.LayerNorm,
                            patch_embed=tmm.PatchEmbedOmnivore, num_classes=None)
    model = tmm.Omnivore(enc, tmm._multimodal_head(enc.num_features)).eval()
    with torch.no_grad():  # non-trivial norms, biases and position-bias tables
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() > 1 else 1.0))
    return model


SPEC = omnivore(omnivore_encoder(**CFG, stochastic_depth_prob=0.2))
INPUTS = {"image": (2, 3, 1, 20, 24), "video": (2, 3, 5, 20, 24), "rgbd": (2, 4, 1, 20, 24)}


@pytest.fixture(scope="module")
def ref():
    return reference()


def test_spec_inferred_from_the_state_dict(ref):
    assert infer_spec(ref.state_dict()) == SPEC


@pytest.mark.parametrize("input_type", list(INPUTS))
def test_same_outputs_and_gradients(ref, input_type):
    params = from_torchmultimodal(ref.state_dict(), SPEC)
    x = pr.normal(pr.key(1), INPUTS[input_type])
    with torch.no_grad():
        expected = ref(x, input_type)
    out = SPEC(params, x, input_type)
    torch.testing.assert_close(out.logits, expected, **TOL)
    torch.testing.assert_close(out.pooled, ref.encoder(x), **TOL)
    # images also as (B, 3, H, W) / (B, 4, H, W) (the reference takes only 5-d input)
    if input_type != "video":
        torch.testing.assert_close(SPEC(params, x[:, :, 0], input_type).logits, expected, **TOL)
    # gradients w.r.t. every parameter, through the reference's autograd
    w = torch.cos(torch.arange(expected.numel(), dtype=torch.float32)).view(expected.shape)
    ref.zero_grad()
    (ref(x, input_type) * w).sum().backward()
    g = torch.func.grad(lambda p: (SPEC(p, x, input_type).logits * w).sum())(
        from_torchmultimodal({k: v.detach().clone() for k, v in ref.state_dict().items()}, SPEC))
    theirs = {k: (p.grad if p.grad is not None else torch.zeros_like(p)) for k, p in ref.named_parameters()}
    ours = to_torchmultimodal(g, SPEC)
    for k, v in theirs.items():
        torch.testing.assert_close(ours[k], v, rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.skipif(not lk.available(), reason="this torch build has no oneDNN linear")
def test_inference_scope_gives_the_reference_outputs(ref, monkeypatch):
    """Inside ``frozen_weights`` every Linear (the tiny ones too: ``MIN_MACS`` 0) runs oneDNN over weights
    reordered once; calls after the first use the copies and still give the reference's outputs."""
    monkeypatch.setattr(lk, "MIN_MACS", 0)
    params = from_torchmultimodal(ref.state_dict(), SPEC)
    scope = lk.frozen_weights()
    for input_type, shape in INPUTS.items():
        x = pr.normal(pr.key(2), shape)
        with torch.no_grad():
            expected = ref(x, input_type)
            for _ in range(3):
                with scope:
                    torch.testing.assert_close(SPEC(params, x, input_type).logits, expected, **TOL)
    copies = {k for k, entry in scope._cache.items() if entry[3] is not None}
    linears = [v for k, v in flatten(params).items() if k.endswith(("qkv.weight", "proj.weight", "mlp.0.weight",
                                                                       "mlp.3.weight", "reduction.weight"))
               and v.dim() == 2]
    assert linears and {id(w) for w in linears} <= copies  # every Linear of the stages ran on a reordered copy


def test_conversion_is_exact_both_ways(ref):
    sd = ref.state_dict()
    params = from_torchmultimodal(sd, SPEC)
    back = to_torchmultimodal(params, SPEC)
    assert list(back) == list(sd)  # same keys, the reference's order (index buffers regenerated)
    for k in sd:
        assert torch.equal(back[k], sd[k]), k
    mine = randomize(SPEC.init(key=pr.key(3)), 3)
    fresh = reference(seed=1)
    fresh.load_state_dict(to_torchmultimodal(mine, SPEC), strict=True)
    x = pr.normal(pr.key(4), INPUTS["video"])
    with torch.no_grad():
        torch.testing.assert_close(SPEC(mine, x, "video").logits, fresh(x, "video"), **TOL)
    again = from_torchmultimodal(fresh.state_dict(), SPEC)
    again, mine = flatten(again), flatten(mine)
    assert again.keys() == mine.keys() and all(torch.equal(again[k], mine[k]) for k in mine)


def test_published_two_file_layout(ref):
    sd = ref.state_dict()
    enc = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
    heads = {k[len("heads."):]: v for k, v in sd.items() if k.startswith("heads.")}
    assert merge_published(enc, heads).keys() == sd.keys()


def test_conversion_errors_name_the_keys(ref):
    sd = dict(ref.state_dict())
    with pytest.raises(ValueError, match=r"unknown keys \(1\): encoder.bogus"):
        from_torchmultimodal(sd | {"encoder.bogus": torch.zeros(1)}, SPEC)
    del sd["heads.rgbd.bias"]
    with pytest.raises(ValueError, match=r"missing keys \(1\): heads.rgbd.bias"):
        from_torchmultimodal(sd, SPEC)
    with pytest.raises(ValueError, match="relative_position_index"):
        from_torchmultimodal(reference(window=(2, 3, 3)).state_dict(),
                             omnivore(omnivore_encoder(**(CFG | {"window_size": (2, 2, 2)}))))
