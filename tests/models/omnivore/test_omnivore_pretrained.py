"""load_pretrained: the published two-file layout through the hub (file:// URLs standing in for the
network), the digest prefix in the file name, one-file state dicts, the shells' loader."""

import hashlib
import os

import pytest
import torch

import polymodal.nn as pnn
from checks import randomize
from polymodal.core import random as pr
from polymodal.core.pytree import flatten, save
from polymodal.models.omnivore import build, pretrained, to_torchmultimodal


def _published(tmp_path, spec, params):
    """Write the encoder and heads files as download.pytorch.org names them (sha256 prefix in the name)."""
    sd = to_torchmultimodal(params, spec)
    urls = {}
    for part in ("encoder", "heads"):
        sub = {k[len(part) + 1:]: v for k, v in sd.items() if k.startswith(part + ".")}
        tmp = tmp_path / f"{part}.pth"
        torch.save(sub, tmp)
        digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
        final = tmp_path / "origin" / f"omnivore_tiny_{part}-{digest[:8]}.pth"
        final.parent.mkdir(exist_ok=True)
        os.replace(tmp, final)
        urls[f"tiny_{part}"] = final.as_uri()
    return urls


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    spec = build("omnivore_tiny")
    params = randomize(spec.init(key=pr.key(0)), 0)
    urls = _published(tmp_path, spec, params)
    for k, v in urls.items():
        monkeypatch.setitem(pretrained.URLS, k, v)
    monkeypatch.setitem(pretrained.PUBLISHED, "omnivore_tiny", ("tiny_encoder", "tiny_heads"))
    return spec, params, tmp_path / "cache"


def _same(a, b):
    fa, fb = flatten(a), flatten(b)
    return fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)


def test_downloads_checks_caches_and_converts(tiny):
    spec, params, cache = tiny
    pre = pretrained.load_pretrained("omnivore_tiny", cache_dir=cache, progress=False)
    assert pre.spec == spec and _same(pre.params, params)
    assert sorted(p.name.split("-")[0] for p in cache.iterdir()) == ["omnivore_tiny_encoder", "omnivore_tiny_heads"]
    again = pretrained.load_pretrained("omnivore_tiny", cache_dir=cache, progress=False)  # from the cache
    assert _same(again.params, params)


def test_a_file_whose_digest_does_not_match_its_name_is_refused(tiny):
    spec, params, cache = tiny
    pretrained.load_pretrained("omnivore_tiny", cache_dir=cache, progress=False)
    enc = next(cache.glob("omnivore_tiny_encoder-*"))
    torch.save({"tampered": torch.zeros(1)}, enc)
    with pytest.raises(ValueError, match=r"wrong sha256 \(expected [0-9a-f]{8}\.\.\., got [0-9a-f]{64}\); delete it"):
        pretrained.load_pretrained("omnivore_tiny", cache_dir=cache, progress=False)


def test_offline_error_names_the_file_and_the_way_out(tmp_path, monkeypatch):
    monkeypatch.setitem(pretrained.URLS, "swin_t_encoder", (tmp_path / "nowhere-b7e39400.pth").as_uri())
    with pytest.raises(RuntimeError, match=r"(?s)load_pretrained\('omnivore_swin_t'\): could not download .*encoder_path="):
        pretrained.load_pretrained("omnivore_swin_t", cache_dir=tmp_path / "c", progress=False)


def test_one_file_in_either_layout_and_the_shell_loader(tiny, tmp_path):
    spec, params, _ = tiny
    theirs, ours = tmp_path / "tmm.pth", tmp_path / "ours.safetensors"
    torch.save(to_torchmultimodal(params, spec), theirs)
    save(str(ours), params)
    for path in (theirs, ours):
        assert _same(pretrained.load_pretrained("omnivore_tiny", path=path).params, params)
    shell = pnn.Omnivore.from_pretrained_name("omnivore_tiny", path=ours)
    x = torch.rand(2, 3, 4, 32, 32)
    torch.testing.assert_close(shell(x, "video").logits, spec(params, x, "video").logits)
