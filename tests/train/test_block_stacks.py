"""Declared block stacks (``Spec.block_stacks()``) equal what the seam records a call running, per family."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from polymodal.core import random as pr
from polymodal.core.encoders.swin3d import swin3d
from polymodal.core.layers.seam import record_stacks
from polymodal.core.layers.transformer import (
    TransformerDecoder, TransformerDecoderLayer, TransformerEncoder, TransformerEncoderLayer,
)
from polymodal.core.spec import Spec
from polymodal.models.clip import build
from polymodal.models.gpt.model import multimodal_gpt
from polymodal.train.distributed.sharding import block_stacks


@dataclass(frozen=True)
class _Pair(Spec):
    """Composed by fields: the default declaration nests each field's stacks under its name."""

    enc: TransformerEncoder  # first stack
    dec: TransformerDecoder  # second stack

    def init(self, *, key):
        ka, kb = pr.split(key)
        return {"enc": self.enc.init(key=ka), "dec": self.dec.init(key=kb)}

    def __call__(self, params, x):
        m = self.enc(params["enc"], x).last_hidden_state
        return self.dec(params["dec"], x, m).last_hidden_state


def _cases():
    clip, clip_rn = build("clip_tiny"), build("clip_tiny_rn")
    gpt = multimodal_gpt(7, 5, (3,), (2, 2), d_model=16, num_heads=2, num_layers=2)
    swin = swin3d(embed_dim=4, depths=(2, 1, 1), num_heads=(1, 1, 2), window_size=(2, 2, 2), num_classes=3)
    layer = TransformerEncoderLayer(8, 2, 16)
    pair = _Pair(TransformerEncoder(layer, 2), TransformerDecoder(TransformerDecoderLayer(8, 2, 16), 2))
    tokens = torch.randint(0, 100, (2, clip.context_length))
    return {
        "clip_vit": (clip, lambda s, p: s(p, torch.randn(2, 3, 64, 64), tokens),
                     ["visual.transformer.layers", "text.transformer.layers"]),
        "clip_resnet": (clip_rn, lambda s, p: s(p, torch.randn(2, 3, 64, 64), tokens[:, :16]),
                        ["visual.layer1", "visual.layer2", "visual.layer3", "visual.layer4",
                         "text.transformer.layers"]),
        "gpt": (gpt, lambda s, p: s(p, torch.randint(0, 7, (2, 3)), torch.randint(0, 5, (2, 4))), ["decoder.layers"]),
        "swin3d": (swin, lambda s, p: s(p, torch.randn(1, 3, 4, 32, 32)), ["stages.0", "stages.1", "stages.2"]),
        "composed_by_fields": (pair, lambda s, p: s(p, torch.randn(2, 3, 8)), ["enc.layers", "dec.layers"]),
    }


@pytest.mark.parametrize("name", list(_cases()))
def test_declared_stacks_are_the_ones_the_seam_runs(name):
    spec, call, expected = _cases()[name]
    params = spec.init(key=pr.key(0))
    assert block_stacks(spec, params) == expected
    assert sorted(record_stacks(lambda p: call(spec, p), params)) == sorted(expected)


def test_swin3d_merges_are_not_a_stack():
    swin = swin3d(embed_dim=4, depths=(1, 1), num_heads=(1, 2), window_size=(2, 2, 2))
    params = swin.init(key=pr.key(0))
    assert "merges" in params and "merges" not in block_stacks(swin, params)


def test_block_stacks_errors_name_the_problem():
    spec = TransformerEncoder(TransformerEncoderLayer(8, 2, 16), 2)
    with pytest.raises(KeyError, match=r"\['layerz'\] are not lists in params"):
        block_stacks(["layerz"], spec.init(key=pr.key(0)))
    with pytest.raises(TypeError, match="expected a Spec or an iterable"):
        block_stacks("layers")
