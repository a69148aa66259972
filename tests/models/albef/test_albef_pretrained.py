"""load_pretrained through the hub (a file:// mirror, no network) and the family's shells."""

from __future__ import annotations

import hashlib

import pytest
import torch

from polymodal import nn as pnn
from polymodal.core import pytree
from polymodal.core import random as pr
from polymodal.models.albef import pretrained
from polymodal.models.albef.builders import albef_tiny
from polymodal.models.albef.convert import to_torchmultimodal


def test_load_pretrained_from_a_mirror_checks_sha256(tmp_path, monkeypatch):
    spec = albef_tiny(mlm=False)
    params = spec.init(key=pr.key(0))
    state = spec.initial_state(params, key=pr.key(1))
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    f = mirror / "pretrained_retrieval_checkpoint.pt"
    torch.save(to_torchmultimodal(params, state, spec), f)
    sha = hashlib.sha256(f.read_bytes()).hexdigest()
    monkeypatch.setitem(pretrained._SPECS, "retrieval", lambda: spec)  # the published one is full size
    monkeypatch.setenv("POLYMODAL_HUB_MIRROR", mirror.as_uri())
    monkeypatch.setitem(pretrained.PRETRAINED_URLS, "retrieval", (tmp_path / "nowhere" / f.name).as_uri())  # offline
    monkeypatch.setenv("POLYMODAL_CACHE", str(tmp_path / "cache"))
    pre = pretrained.load_pretrained("retrieval", sha256=sha, progress=False)
    for a, b in ((pre.params, params), (pre.state, state)):
        fa, fb = pytree.flatten(a), pytree.flatten(b)
        assert sorted(fa) == sorted(fb) and all(torch.equal(fa[k], fb[k]) for k in fa)
    assert (tmp_path / "cache" / "albef" / f.name).is_file()
    with pytest.raises(RuntimeError, match="sha256 mismatch"):  # the mirror's bytes are refused
        pretrained.load_pretrained("retrieval", cache_dir=tmp_path / "other", sha256="0" * 64, progress=False)
    with pytest.raises(ValueError, match="expected one of \\['retrieval', 'vqa'\\]"):
        pretrained.load_pretrained("coco")


def test_shell_exposes_inference_methods():
    model = pnn.build("albef_tiny", key=pr.key(0))
    spec, params = model.spec, model.params
    images, ids = torch.randn(2, 3, 32, 32), torch.tensor([[2, 5, 3], [2, 6, 3]])
    h, f = model.image_features(images)
    th, tf = model.text_features(ids)
    torch.testing.assert_close(f, spec.image_features(params, images)[1])
    torch.testing.assert_close(model.itm_scores(h, th, None), spec.itm_scores(params, h, th, None))
    assert sorted(model.state_dict()) == sorted(pytree.flatten(params))
