"""VideoCLIP spec: generic checks, shapes, bad input, pretrained loading from a local mirror."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch

from checks import check_compile, check_spec
from polymodal.core import random as pr
from polymodal.core.convert import meta_init
from polymodal.core.encoders.s3d import S3D_BLOCKS, s3d_tiny
from polymodal.core.pytree import flatten, num_params, tree_map
from polymodal.models.mugen.videoclip_builders import videoclip, videoclip_tiny
from polymodal.models.mugen.videoclip_convert import to_torchmultimodal
from polymodal.models.mugen.videoclip_pretrained import URLS, load_pretrained, load_video_encoder


def _small():
    blocks = tuple(tuple(max(1, c // 32) for c in b) for b in S3D_BLOCKS)  # 1/32 width: compiles in seconds
    return videoclip_tiny(video=s3d_tiny(stem=(4, 4, 8), blocks=blocks))


def _ids():
    return torch.tensor([[1, 5, 6, 7, 2], [1, 9, 2, 0, 0]])


def _generic(compile: bool) -> None:
    spec = _small()
    params = tree_map(lambda t: pr.normal(pr.key(t.numel()), t.shape) * 0.3 if t.dim() > 1 else t,
                      spec.init(key=pr.key(0)))
    video, ids = torch.rand(2, 3, 8, 32, 32), _ids()
    if compile:
        check_compile(spec, params, [video, ids])
    else:
        check_spec(spec, params, [video, ids], vmap_inputs=[video[None], ids[None]], compile=False)


def test_generic_checks():
    """Shell, vmap, grad, safetensors; the S3D's fullgraph compile is checked in test_videoclip_s3d.py."""
    _generic(compile=False)


@pytest.mark.slow
def test_compiles_fullgraph():
    _generic(compile=True)


def test_shapes_and_normalisation():
    spec = videoclip_tiny()
    p, s = spec.init(key=pr.key(0)), spec.init_state()
    video = torch.rand(2, 3, 8, 32, 32)
    out, s2 = spec(p, video, _ids(), s)
    assert out.text_embeddings.shape == out.video_embeddings.shape == (2, 32)
    torch.testing.assert_close(out.video_embeddings.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(out.text_embeddings, spec.encode_text(p, _ids()))
    torch.testing.assert_close(out.video_embeddings, spec.encode_video(p, video, state=s))
    assert s2 is s
    _, s3 = spec(p, torch.rand(2, 3, 8, 32, 32), _ids(), s, training=True, key=pr.key(1))
    assert int(flatten(s3)["video.encoder.features.0.0.1.num_batches_tracked"]) == 1
    assert spec.loss(p, out).loss.shape == ()


def test_mugen_sizes():
    spec = videoclip()
    p = meta_init(spec)
    # DistilBERT-base (Sanh et al. 2019) and torchvision's S3D without its classifier
    assert num_params(p["text"]["encoder"]) == 66_362_880
    assert num_params(p["video"]["encoder"]) == 7_910_048
    assert spec.proj_dim == 256 and spec.context_length == 512 and spec.video.pool_kernel == (2, 7, 7)


def test_bad_input():
    spec = videoclip_tiny()
    p = spec.init(key=pr.key(0))
    v = torch.rand(2, 3, 8, 32, 32)
    with pytest.raises(ValueError, match=r"expected video of shape \(B, 3, T, H, W\), got \(3, 8, 32, 32\)"):
        spec(p, v[0], _ids())
    with pytest.raises(ValueError, match=r"expected video of shape \(B, 3, T, H, W\), got \(2, 1, 8, 32, 32\)"):
        spec.encode_video(p, v[:, :1])
    with pytest.raises(ValueError, match="expected at least 5 frames of 17x17"):
        spec(p, v[:, :, :4], _ids())
    with pytest.raises(ValueError, match="text of 20 tokens is longer than the text context: expected at most 16"):
        spec(p, v, torch.ones(2, 20, dtype=torch.long))
    with pytest.raises(ValueError, match=r"expected input_ids of shape \(B, L\), got \(5,\)"):
        spec.encode_text(p, _ids()[0])
    with pytest.raises(TypeError, match="input_ids"):
        spec.encode_text(p, _ids().float())


def test_load_pretrained_from_a_mirror(tmp_path, monkeypatch):
    """The published file names, served from a local mirror (nothing is downloaded)."""
    spec = videoclip_tiny()
    params, state = spec.init(key=pr.key(3)), spec.init_state()
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    lit = to_torchmultimodal(params, state, spec=spec, lightning=True)
    torch.save({"state_dict": lit, "epoch": 3}, mirror / os.path.basename(URLS["videoclip_mugen"]))
    video_sd = {k.replace("model.encoder_b.0.", ""): v for k, v in lit.items() if k.startswith("model.encoder_b.0.")}
    torch.save(video_sd, mirror / os.path.basename(URLS["s3d_kinetics400"]))
    torch.save(video_sd, mirror / os.path.basename(URLS["video_encoder"]))
    monkeypatch.setenv("POLYMODAL_HUB_MIRROR", mirror.as_uri())
    got = load_pretrained("videoclip_mugen", cache_dir=tmp_path / "cache", spec=spec, progress=False)
    for k, v in (flatten(params) | flatten(state)).items():
        assert torch.equal((flatten(got.params) | flatten(got.state))[k], v), k
    enc = load_video_encoder("s3d_kinetics400", cache_dir=tmp_path / "cache", spec=spec.video, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(flatten(enc.params).values(), flatten(params["video"]["encoder"]).values()))
    # (the published URL is unreachable here, so the refusal comes inside the "could not download" error)
    with pytest.raises(RuntimeError, match=r"(?s)load_pretrained\('video_encoder'\): .*sha256 mismatch .*expected b0e27f13\.\.\."):
        load_video_encoder("video_encoder", cache_dir=tmp_path / "cache", spec=spec.video, progress=False)
    assert not any("video_encoder" in p.name for p in (tmp_path / "cache").iterdir())  # refused before caching
    with pytest.raises(ValueError, match="no published weights for 'nope'"):
        load_pretrained("nope", cache_dir=tmp_path / "cache", spec=spec)


_TINY = videoclip_tiny()
_TINY_P = _TINY.init(key=pr.key(5))


@settings(max_examples=4, deadline=None)
@given(perm=st.permutations(range(4)))
def test_batch_permutation_equivariance(perm):
    """Eval mode: permuting the pairs permutes the embeddings and leaves the loss unchanged."""
    g = torch.Generator().manual_seed(0)
    video, ids = torch.rand(4, 3, 8, 32, 32, generator=g), torch.randint(3, 20, (4, 6), generator=g)
    perm = torch.tensor(perm)
    out, _ = _TINY(_TINY_P, video, ids)
    out_p, _ = _TINY(_TINY_P, video[perm], ids[perm])
    torch.testing.assert_close(out_p.video_embeddings, out.video_embeddings[perm], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out_p.text_embeddings, out.text_embeddings[perm], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(_TINY.loss(_TINY_P, out_p).loss, _TINY.loss(_TINY_P, out).loss, atol=1e-6, rtol=1e-5)
