"""Loading MUGEN's published text-to-video GPT files (local files in the reference layout; no network)."""

import pytest
import torch

from polymodal import hub
from polymodal.core import random as pr
from polymodal.core.pytree import flatten
from polymodal.models.mugen import pretrained, text_video_gpt
from polymodal.models.mugen.convert import to_torchmultimodal
from polymodal.registry import family


def test_load_pretrained_reads_a_reference_file_and_checks_the_url_hash(tmp_path, monkeypatch):
    spec = text_video_gpt(13, 5, (2, 2, 2), 256, 32, d_model=24, num_heads=2, num_layers=1)
    monkeypatch.setattr(pretrained, "mugen_gpt", lambda video_latent_shape: spec)  # the real one is 85M parameters
    p = spec.init(key=pr.key(0))
    fam = family("vqvae")  # a tiny VQ-VAE stands in for MUGEN's (26M parameters)
    vqvae = fam.build("tiny")
    vq_params, vq_state = vqvae.init(key=pr.key(1)), vqvae.init_state()
    vq_sd = fam.extra["to_torchmultimodal"](vq_params, vq_state, vqvae)
    p["out_embed"]["weight"] = vq_sd["codebook.embedding"]  # the GPT's video table is the codebook's
    monkeypatch.setattr(pretrained, "_mugen_vqvae", lambda: (vqvae, fam.extra["from_torchmultimodal"]))
    path = tmp_path / "gpt.pth"
    torch.save(to_torchmultimodal(p, spec, {f"out_tokenizer.{k}": v for k, v in vq_sd.items()}), path)
    got = pretrained.load_pretrained("mugen_L32", path=path)
    assert torch.equal(got.params["sos"], p["sos"])
    # The VQ-VAE comes back converted: the same tensors as the params and state written into the file.
    assert got.vqvae is vqvae
    # (A loaded codebook counts as initialised: the fresh state's lazy-init flag is the one difference.)
    for ours, theirs in ((got.vqvae_params, vq_params), (got.vqvae_state, vq_state)):
        a, b = flatten(ours), flatten(theirs)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a if k != "codebook.initialized")
    assert bool(flatten(got.vqvae_state)["codebook.initialized"])
    monkeypatch.setenv("POLYMODAL_CACHE", str(tmp_path))
    (tmp_path / "mugen").mkdir()
    name = pretrained.MUGEN_GPT_URLS["mugen_L16"].rsplit("/", 1)[-1]
    (tmp_path / "mugen" / name).write_bytes(path.read_bytes())
    assert not hub.sha256_of(path).startswith("5dfc5a0a")
    with pytest.raises(ValueError, match=r"wrong sha256 \(expected 5dfc5a0a\.\.\."):
        pretrained.load_pretrained("mugen_L16")
    with pytest.raises(ValueError, match="unknown MUGEN GPT"):
        pretrained.load_pretrained("mugen_L64")
