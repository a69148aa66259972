"""Loading MUGEN's published text-to-video GPT files (local files in the reference layout; no network)."""

import pytest
import torch

from polymodal import hub
from polymodal.core import random as pr
from polymodal.models.mugen import pretrained, text_video_gpt
from polymodal.models.mugen.convert import to_torchmultimodal


def test_load_pretrained_reads_a_reference_file_and_checks_the_url_hash(tmp_path, monkeypatch):
    spec = text_video_gpt(13, 5, (2, 2, 2), 32, 8, d_model=24, num_heads=2, num_layers=1)
    monkeypatch.setattr(pretrained, "mugen_gpt", lambda video_latent_shape: spec)  # the real one is 85M parameters
    p = spec.init(key=pr.key(0))
    vq = {"out_tokenizer.encoder.conv_out.conv.weight": torch.ones(2)}
    path = tmp_path / "gpt.pth"
    torch.save(to_torchmultimodal(p, spec, vq), path)
    got = pretrained.load_pretrained("mugen_L32", path=path)
    assert torch.equal(got.params["sos"], p["sos"]) and list(got.vqvae_state_dict) == [
        "encoder.conv_out.conv.weight", "codebook.embedding"]
    monkeypatch.setenv("POLYMODAL_CACHE", str(tmp_path))
    (tmp_path / "mugen").mkdir()
    name = pretrained.MUGEN_GPT_URLS["mugen_L16"].rsplit("/", 1)[-1]
    (tmp_path / "mugen" / name).write_bytes(path.read_bytes())
    assert not hub.sha256_of(path).startswith("5dfc5a0a")
    with pytest.raises(ValueError, match="does not match the sha256 prefix 5dfc5a0a"):
        pretrained.load_pretrained("mugen_L16")
    with pytest.raises(ValueError, match="unknown MUGEN GPT"):
        pretrained.load_pretrained("mugen_L64")
