"""load_pretrained: a TorchMultimodal checkpoint file (path and hub cache), polymodal's own layout, sha256."""

import pytest
import torch

from polymodal.core import random as pr
from polymodal.core.pytree import flatten, save
from polymodal.models.flava import flava_model
from polymodal.models.flava.convert import to_torchmultimodal
from polymodal.models.flava.pretrained import URLS, load_pretrained

KW = dict(image_hidden_size=32, image_num_attention_heads=2, image_num_hidden_layers=1, image_intermediate_size=64,
          image_size=32, patch_size=8, text_hidden_size=32, text_num_attention_heads=2, text_num_hidden_layers=1,
          text_intermediate_size=64, vocab_size=50, multimodal_hidden_size=32, multimodal_num_attention_heads=2,
          multimodal_num_hidden_layers=1, multimodal_intermediate_size=64, text_and_image_proj_size=24)


def test_local_file_cache_and_sha(tmp_path):
    spec = flava_model(**KW)
    params = spec.init(key=pr.key(0))
    f = tmp_path / "ckpt.pt"
    torch.save(to_torchmultimodal(params, spec), f)
    got = load_pretrained(path=f, spec=spec)
    assert all(torch.equal(a, b) for a, b in zip(flatten(got.params).values(), flatten(params).values()))
    # the hub cache: a file already there under the URL's name is used without a download
    cached = tmp_path / "cache"
    cached.mkdir()
    (cached / URLS["flava_full_model"].rsplit("/", 1)[-1]).write_bytes(f.read_bytes())
    got = load_pretrained("flava_full_model", cache_dir=cached, spec=spec)
    assert torch.equal(got.params["mm_encoder"]["cls_token"], params["mm_encoder"]["cls_token"])
    with pytest.raises(ValueError, match="wrong sha256"):
        load_pretrained("flava_full_model", cache_dir=cached, spec=spec, sha256="0" * 64)
    save(str(tmp_path / "ours.safetensors"), params)  # polymodal's own layout
    got = load_pretrained(path=tmp_path / "ours.safetensors", spec=spec)
    assert torch.equal(got.params["text_projection"]["weight"], params["text_projection"]["weight"])
    with pytest.raises(ValueError, match="no published FLAVA weights"):
        load_pretrained("flava_huge")
