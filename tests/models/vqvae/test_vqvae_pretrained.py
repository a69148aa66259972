"""Loading MUGEN's published VQ-VAE files (a local file in the reference layout; no network)."""

import pytest
import torch

from polymodal.core import random as pr
from polymodal.models.vqvae import pretrained, video_vqvae
from polymodal.models.vqvae.convert import to_torchmultimodal

SMALL = dict(encoder_hidden_dim=8, n_res_layers=1, attn_hidden_dim=8, num_embeddings=16, embedding_dim=4,
             decoder_hidden_dim=8)


def test_load_pretrained_reads_a_reference_file(tmp_path, monkeypatch):
    spec = video_vqvae(((4, 4, 4),), ((2, 2, 2),), **SMALL)
    monkeypatch.setattr(pretrained, "mugen_vqvae", lambda: spec)  # the real one is 26M parameters
    p, s = spec.init(key=pr.key(0)), spec.init_state()
    path = tmp_path / "mugen_video_vqvae_L32.pt"
    torch.save(to_torchmultimodal(p, s, spec), path)
    got = pretrained.load_pretrained("mugen_L32", path=path)
    assert got.spec == spec and torch.equal(got.params["encoder"]["convs"][0]["conv"]["weight"],
                                            p["encoder"]["convs"][0]["conv"]["weight"])
    assert bool(got.state["codebook"]["initialized"])
    # through the hub cache (what a download would have written): found without a network
    monkeypatch.setenv("POLYMODAL_CACHE", str(tmp_path))
    (tmp_path / "mugen").mkdir()
    (tmp_path / "mugen" / "mugen_video_vqvae_L8.pt").write_bytes(path.read_bytes())
    assert pretrained.load_pretrained("mugen_L8").spec == spec
    with pytest.raises(ValueError, match=r"unknown MUGEN VQ-VAE 'L64'; expected one of \['mugen_L16'"):
        pretrained.load_pretrained("L64")
    assert all(u.startswith("https://download.pytorch.org/models/multimodal/mugen/")
               for u in pretrained.MUGEN_VQVAE_URLS.values())
