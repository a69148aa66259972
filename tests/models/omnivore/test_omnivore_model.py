"""Omnivore spec: generic checks per input type, parameter counts vs TorchMultimodal, the seam
(checkpointing, declared stacks), head dropout, bad input."""

import pytest
import torch
from torchmultimodal.models import omnivore as tmm

from checks import check_spec
from polymodal.core import random as pr
from polymodal.core.convert import meta_init
from polymodal.core.layers.seam import record_stacks, use_policy
from polymodal.core.pytree import flatten, leaves, tree_map
from polymodal.models.omnivore import Omnivore, build, omnivore, omnivore_encoder
from polymodal.train.distributed.sharding import block_stacks
from polymodal.train.policy import checkpoint_policy, training_policy

# A small model: two stages (a patch-merging layer between), window (2, 2, 2), drop path on.
SPEC = omnivore(omnivore_encoder(embed_dim=8, depths=(2, 1), num_heads=(1, 2), window_size=(2, 2, 2),
                                 stochastic_depth_prob=0.2),
                (("image", "image", 5, 0.0), ("video", "video", 4, 0.5), ("rgbd", "rgbd", 3, 0.0)))
INPUTS = {"image": (2, 3, 16, 16), "video": (2, 3, 4, 16, 16), "rgbd": (2, 4, 16, 16)}


@pytest.fixture(scope="module")
def params():
    return SPEC.init(key=pr.key(0))


@pytest.mark.parametrize("input_type", list(INPUTS))
def test_generic_checks(params, input_type):
    x = pr.normal(pr.key(1), INPUTS[input_type])
    check_spec(SPEC, params, (x,), {"input_type": input_type}, compile=input_type == "video")


@pytest.mark.parametrize("size", ["t", pytest.param("s", marks=pytest.mark.slow), pytest.param("b", marks=pytest.mark.slow)])
def test_parameter_counts_equal_the_reference(size):
    with torch.device("meta"):
        ref = getattr(tmm, f"omnivore_swin_{size}")()
    ours = meta_init(build(f"omnivore_swin_{size}"))
    assert sum(v.numel() for v in flatten(ours).values()) == sum(p.numel() for p in ref.parameters())
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items() if not k.endswith("relative_position_index")}
    from polymodal.models.omnivore.convert import to_theirs_names
    assert {k: tuple(v.shape) for k, v in to_theirs_names(flatten(ours)).items()} == ref_shapes


def test_reference_hyperparameters():
    t, s, b = (build(f"omnivore_swin_{n}") for n in "tsb")
    assert (t.encoder.embed_dim, t.encoder.depths, t.encoder.num_heads, t.encoder.window_size) == (
        96, (2, 2, 6, 2), (3, 6, 12, 24), (8, 7, 7))
    assert (s.encoder.depths, b.encoder.embed_dim, b.encoder.num_heads, b.encoder.window_size) == (
        (2, 2, 18, 2), 128, (4, 8, 16, 32), (16, 7, 7))
    for spec, p in ((t, 0.2), (s, 0.3), (b, 0.3)):
        assert spec.encoder.drop_path_rates()[-1] == pytest.approx(p)
        assert {h.name: (h.linear.out_features, h.dropout) for h in spec.heads} == {
            "image": (1000, 0.0), "video": (400, 0.5), "rgbd": (19, 0.0)}


def test_image_is_a_one_frame_video(params):
    img = pr.normal(pr.key(2), (2, 3, 16, 16))
    a = SPEC(params, img, "image").logits
    torch.testing.assert_close(a, SPEC(params, img[:, :, None], "image").logits, rtol=0, atol=0)
    # the image head on the encoder's pooled features of the video (B, 3, 1, H, W)
    pooled = SPEC.encoder(params["encoder"], img[:, :, None]).pooled
    torch.testing.assert_close(a, pooled @ params["heads"]["image"]["weight"].T + params["heads"]["image"]["bias"])


def test_depth_changes_the_output_and_uses_its_own_projection(params):
    rgbd = pr.normal(pr.key(3), (2, 4, 16, 16))
    out = SPEC(params, rgbd, "rgbd").pooled
    assert not torch.allclose(out, SPEC.encoder(params["encoder"], rgbd[:, :3, None]).pooled)
    g = torch.func.grad(lambda p: SPEC(p, rgbd, "rgbd").logits.sum())(params)
    assert float(g["encoder"]["patch_embed"]["depth_patch_embed"]["proj"]["weight"].abs().sum()) > 0
    g = torch.func.grad(lambda p: SPEC(p, rgbd[:, :3], "image").logits.sum())(params)
    assert float(g["encoder"]["patch_embed"]["depth_patch_embed"]["proj"]["weight"].abs().sum()) == 0


def test_video_head_dropout_only_with_a_key(params):
    v = pr.normal(pr.key(4), (2, 3, 4, 16, 16))
    plain = SPEC(params, v, "video")
    torch.testing.assert_close(plain.logits, SPEC(params, v, "video").logits, rtol=0, atol=0)
    a, b = SPEC(params, v, "video", key=pr.key(5)), SPEC(params, v, "video", key=pr.key(5))
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)
    assert not torch.allclose(a.logits, plain.logits)


def test_declared_stacks_are_what_the_seam_runs(params):
    expected = ["encoder.stages.0", "encoder.stages.1"]
    assert block_stacks(SPEC, params) == expected
    for t, shape in INPUTS.items():
        x = pr.normal(pr.key(6), shape)
        assert record_stacks(lambda p: SPEC(p, x, t), params) == expected
    assert "encoder.merges" not in block_stacks(SPEC, params)  # gathered with the rest when sharded


@pytest.mark.parametrize("input_type", ["video", "rgbd"])
def test_checkpointed_gradients_equal_plain(params, input_type):
    x = pr.normal(pr.key(7), INPUTS[input_type])

    def grads(policy):
        p = tree_map(lambda t: t.detach().clone().requires_grad_(), params)
        with use_policy(policy):
            out = SPEC(p, x, input_type, key=pr.key(8)).logits  # drop path + dropout: redrawn from the keys
        loss = (out * torch.linspace(-1, 1, out.shape[-1])).sum()
        loss.backward()
        return loss.detach(), [t.grad for t in leaves(p)]

    loss0, g0 = grads(checkpoint_policy(0))
    for policy in (checkpoint_policy(1), training_policy(sharded=False, checkpoint_every=1)):
        loss, g = grads(policy)
        assert torch.equal(loss, loss0)
        for a, b in zip(g, g0):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_bad_input(params):
    with pytest.raises(ValueError, match=r"input_type: expected one of \('image', 'video', 'rgbd'\), got 'audio'"):
        SPEC(params, torch.zeros(1, 3, 16, 16), "audio")
    with pytest.raises(ValueError, match=r"video x: expected a video of shape \(B, 3, T, H, W\) .* got 3-d \(3, 16, 16\)"):
        SPEC(params, torch.zeros(3, 16, 16), "video")
    with pytest.raises(ValueError, match=r"video x: expected a video .* got 6-d"):
        SPEC(params, torch.zeros(1, 1, 3, 2, 16, 16), "video")
    with pytest.raises(ValueError, match=r"rgbd x: expected an RGB-D image .* \(B, 4, H, W\) .* got \(2, 3, 16, 16\)"):
        SPEC(params, torch.zeros(2, 3, 16, 16), "rgbd")
    with pytest.raises(ValueError, match=r"rgbd x: expected an RGB-D image .* got \(2, 5, 1, 16, 16\)"):
        SPEC(params, torch.zeros(2, 5, 1, 16, 16), "rgbd")
    with pytest.raises(ValueError, match=r"image x: expected an image of shape \(B, 3, H, W\) or \(B, 3, 1, H, W\)"):
        SPEC(params, torch.zeros(2, 3, 4, 16, 16), "image")
    with pytest.raises(TypeError, match="must be a floating"):
        SPEC(params, torch.zeros(2, 3, 16, 16, dtype=torch.int64), "image")
    with pytest.raises(ValueError, match="expected distinct input types"):
        Omnivore(SPEC.encoder, SPEC.heads + SPEC.heads[:1])
