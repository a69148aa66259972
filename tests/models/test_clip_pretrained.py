"""CLIP checkpoints on disk: file formats and layouts, TorchScript archives read without running
their code, download with sha256 verification, and the offline error."""

import hashlib
import io
import pickle
import urllib.error
import zipfile

import pytest
import torch

from checks import assert_close
from polymodal import hub
from polymodal import nn as pnn
from polymodal.core import pytree
from polymodal.core import random as pr
from polymodal.models.clip import (
    CLIP, build, clip_text_transformer, clip_vision_transformer, from_open_clip, load_pretrained, to_open_clip,
    to_torchmultimodal,
)
from polymodal.models.clip import pretrained as pre
from polymodal.models.clip.torchscript import read_torchscript_tensors

open_clip = pytest.importorskip("open_clip")


@pytest.fixture(scope="module")
def tiny():
    spec = build("clip_tiny")
    return spec, spec.init(key=pr.key(0))


@pytest.mark.parametrize("fmt", ["safetensors", "torch", "training_checkpoint", "torchmultimodal", "polymodal"])
def test_load_pretrained_from_local_files(tmp_path, tiny, fmt):
    spec, params = tiny
    sd = to_open_clip(params)
    path = tmp_path / f"w.{'safetensors' if fmt in ('safetensors', 'polymodal') else 'pt'}"
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    elif fmt == "torch":
        torch.save({k: v.half() for k, v in sd.items()}, path)  # OpenAI ships float16
    elif fmt == "training_checkpoint":
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    elif fmt == "torchmultimodal":
        torch.save(dict(to_torchmultimodal(params), logit_scale=params["logit_scale"]), path)
    else:
        pytree.save(path, params)
    loaded = load_pretrained("clip_tiny", path=path)
    assert loaded.spec == spec and loaded.state is None
    tol = 1e-3 if fmt == "torch" else 0
    assert_close(loaded.params, params, atol=tol, rtol=tol)
    assert loaded.params["visual"]["proj"].dtype == torch.float32
    model = pnn.CLIP.from_pretrained_name("clip_tiny", path=path)
    assert_close(model.params, loaded.params, atol=0, rtol=0)


def test_torchscript_archive_is_read_without_running_its_code(tmp_path):
    torch.manual_seed(0)
    ref = open_clip.model.CLIP(24, dict(image_size=16, layers=2, width=32, patch_size=4, head_width=16),
                               dict(context_length=8, vocab_size=60, width=32, heads=2, layers=2), quick_gelu=True)
    ref = ref.eval().half()
    x, t = torch.randn(2, 3, 16, 16).half(), torch.tensor([[1, 5, 59, 0, 0, 0, 0, 0], [1, 7, 8, 9, 59, 0, 0, 0]])
    archive = tmp_path / "model.pt"
    torch.jit.save(torch.jit.trace(ref, (x, t), check_trace=False), archive)
    tensors = read_torchscript_tensors(archive)
    sd = ref.state_dict()
    assert all(torch.equal(tensors[k], sd[k]) for k in sd)
    spec = CLIP(visual=clip_vision_transformer(image_size=16, patch_size=4, width=32, layers=2, heads=2, embed_dim=24),
                text=clip_text_transformer(context_length=8, vocab_size=60, width=32, heads=2, layers=2, embed_dim=24))
    params = from_open_clip(pre.read_state_dict(archive), spec)  # attn_mask attributes are dropped
    with torch.no_grad():
        want = ref.float().encode_image(x.float(), normalize=True)
    assert_close(spec.encode_image(pytree.cast(params, torch.float32), x.float()), want, atol=1e-5, rtol=0)

    evil = tmp_path / "evil.pt"  # a data.pkl that would call os.system if unpickled naively
    payload = b"\x80\x02cos\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02Rq\x03."
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("evil/data.pkl", payload)
        z.writestr("evil/constants.pkl", pickle.dumps(()))
    with pytest.raises(pickle.UnpicklingError, match="refusing to load global os.system"):
        pre.read_state_dict(evil)


def test_download_verifies_sha256_and_caches(tmp_path, tiny, monkeypatch):
    monkeypatch.delenv(hub.MIRROR_ENV, raising=False)
    spec, params = tiny
    blob = tmp_path / "blob.pt"
    torch.save(to_open_clip(params), blob)
    sha = hashlib.sha256(blob.read_bytes()).hexdigest()
    src = tmp_path / "models" / sha / "ViT-B-32.pt"  # OpenAI's URLs: .../<sha256>/<file>
    src.parent.mkdir(parents=True)
    blob.rename(src)
    got = pre.download(src.as_uri(), tmp_path / "cache" / "a.pt", sha, progress=False)
    assert got.read_bytes() == src.read_bytes()
    with pytest.raises(ValueError, match="sha256 mismatch"):
        pre.download(src.as_uri(), tmp_path / "cache" / "b.pt", "0" * 64, progress=False)
    assert [f.name for f in (tmp_path / "cache").iterdir()] == ["a.pt"]  # no partial file left
    monkeypatch.setenv(hub.CACHE_ENV, str(tmp_path / "hub"))
    assert pre.default_cache_dir() == tmp_path / "hub" / "clip"
    monkeypatch.setitem(pre.OPENAI_URLS, "clip_tiny", src.as_uri())
    loaded = load_pretrained("clip_tiny", cache_dir=tmp_path / "cache2", progress=False)
    assert (tmp_path / "cache2" / "ViT-B-32.pt").is_file()
    assert_close(loaded.params, params, atol=0, rtol=0)
    (tmp_path / "cache2" / "ViT-B-32.pt").write_bytes(b"corrupt")
    with pytest.raises(ValueError, match="wrong sha256"):
        load_pretrained("clip_tiny", cache_dir=tmp_path / "cache2")


def test_offline_error_names_the_url_and_the_destination(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(hub.urllib.request, "urlopen", offline)
    monkeypatch.delenv(hub.MIRROR_ENV, raising=False)
    with pytest.raises(RuntimeError) as e:
        load_pretrained("ViT-B/32", cache_dir=tmp_path)
    msg = str(e.value)
    url = pre.OPENAI_URLS["clip_vit_b32"]
    assert url in msg and url.replace("azureedge.net", "blob.core.windows.net") in msg  # both sources tried
    assert str(tmp_path / "ViT-B-32.pt") in msg and "path=" in msg and url.split("/")[-2] in msg
    assert not list(tmp_path.iterdir())  # no partial file left behind
    with pytest.raises(ValueError, match="no published weights for 'clip_tiny'"):
        load_pretrained("clip_tiny", cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        load_pretrained("clip_tiny", path=tmp_path / "nope.pt")
