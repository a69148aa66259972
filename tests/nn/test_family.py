"""Family shells come from the registry: a new family gets ``polymodal.nn`` shells (by builder
name and by spec class name) with its spec's methods on the live parameters, and no edit in
``polymodal.nn``; CLIP's shells are the same mechanism."""

from dataclasses import dataclass, field

import pytest
import torch

from checks import assert_close
from polymodal import nn as pnn
from polymodal import registry
from polymodal.core import random as pr
from polymodal.core.layers import Linear
from polymodal.core.spec import Spec
from polymodal.models.clip import build as clip_build
from polymodal.models.swin3d import swin3d_t


@dataclass(frozen=True)
class ToyModel(Spec):
    """``x (B, 4) -> (B, 2)``, with a running count as state and optional noise from a key."""

    head: Linear = field(default_factory=lambda: Linear(4, 2))  # the one layer

    def init(self, *, key):
        return {"head": self.head.init(key=key)}

    def init_state(self):
        return {"count": torch.zeros(())}

    def __call__(self, params, x, state=None, *, key=None):
        state = self.init_state() if state is None else state
        return self.head(params["head"], x), {"count": state["count"] + 1}

    def score(self, params, x, *, state=None, key=None):
        """``(B, 4) -> (B,)``: the head's first output plus the state's count, plus noise when keyed."""
        y = self.head(params["head"], x)[:, 0] + state["count"]
        return y if key is None else y + pr.normal(key, y.shape)

    def describe(self, prefix):
        return f"{prefix}: {self.head.in_features} -> {self.head.out_features}"


@pytest.fixture
def toy_family():
    registry.families()  # discover the built-in families first
    registry.register_family("toy", builders={"toy_small": ToyModel}, description="test family")
    yield
    registry._FAMILIES.pop("toy")
    vars(pnn).pop("ToyModel", None)


def test_a_new_family_gets_shells_without_editing_polymodal_nn(toy_family):
    model = pnn.build("toy_small", key=pr.key(0))
    assert type(model) is pnn.ToyModel is pnn.spec_shell(ToyModel) and isinstance(model, pnn.Model)
    assert type(pnn.Model("toy_small")) is pnn.ToyModel and type(pnn.ToyModel("toy_small")) is pnn.ToyModel
    assert sorted(model.state_dict()) == ["count", "head.bias", "head.weight"]
    x = pr.normal(pr.key(1), (3, 4))
    p = model.params
    want = x @ p["head"]["weight"].t() + p["head"]["bias"]  # by hand
    model.eval()
    assert_close(model(x), want)
    assert float(model.count) == 1.0  # forward wrote the new state back
    assert_close(model.score(x), want[:, 0] + 1.0)  # params and the live state supplied
    assert_close(model.score(x, state={"count": torch.tensor(5.0)}), want[:, 0] + 5.0)  # explicit state wins
    model.train()
    noisy = model.score(x)  # training mode: a fresh key per call
    assert not torch.allclose(noisy, want[:, 0] + 1.0) and not torch.allclose(noisy, model.score(x))
    assert model.describe("toy") == "toy: 4 -> 2"  # other public methods forwarded as they are
    model.score(x).sum().backward()
    assert model.head.weight.grad is not None  # the methods use the live parameters
    again = pnn.ToyModel.from_params(model.spec, model.params, {"count": torch.tensor(7.0)})
    assert float(again.count) == 7.0 and again.head.weight.data_ptr() == model.head.weight.data_ptr()  # shared
    assert pnn.ToyModel.from_name("toy_small").spec == ToyModel()
    assert pnn.ToyModel(ToyModel(Linear(4, 3))).head.weight.shape == (3, 4)  # from a spec


def test_clip_shells_are_the_generic_ones():
    assert pnn.CLIP is pnn.spec_shell(type(clip_build("clip_tiny")))
    model = pnn.build("clip_tiny", key=pr.key(0))
    assert type(model) is pnn.CLIP and model.spec == clip_build("clip_tiny")
    x, t = pr.normal(pr.key(1), (2, 3, 64, 64)), torch.randint(1, 49407, (2, 32))
    assert_close(model.encode_image(x), model.spec.encode_image(model.params, x))
    assert_close(model.encode_text(t, normalize=False), model.spec.encode_text(model.params, t, False))
    rn = pnn.Model("clip_tiny_rn", key=pr.key(0)).eval()
    assert_close(rn.encode_image(pr.normal(pr.key(2), (2, 3, 64, 64))),
                 rn.spec.encode_image(rn.params, pr.normal(pr.key(2), (2, 3, 64, 64)), state=rn.state))
    from polymodal.nn.family import resolve

    assert resolve("ViT-B-32")[1] == clip_build("ViT-B-32")  # a family's own names (open_clip's) resolve too
    from polymodal.models.gpt import multimodal_gpt

    spec = multimodal_gpt(num_in_tokens=7, num_out_tokens=5, in_shape=(3,), out_shape=(2, 2), d_model=16, num_heads=2,
                          num_layers=1)
    gpt = pnn.MultimodalGPT(spec, key=pr.key(0))  # found through the registry (family "gpt")
    assert type(gpt).__name__ == "MultimodalGPT" and "decoder" in dict(gpt.named_children())
    ids = torch.zeros(1, 3, dtype=torch.long)
    logits, cache = gpt.prefill(ids)  # a spec method on the live params
    assert_close(logits, spec.prefill(gpt.params, ids)[0])


def test_errors_name_what_was_expected():
    with pytest.raises(ValueError, match="'swin3d_t' builds a Swin3D, not a CLIP"):
        pnn.CLIP("swin3d_t")
    with pytest.raises(ValueError, match="unknown builder 'nope'"):
        pnn.build("nope")
    with pytest.raises(TypeError, match="expected a CLIP spec, got Swin3D"):
        pnn.CLIP(swin3d_t())
    with pytest.raises(ValueError, match="'clip_tiny' builds a CLIP with no ModifiedResNet part"):
        pnn.CLIPModifiedResNet.from_name("clip_tiny")
    with pytest.raises(AttributeError, match="has no attribute 'NoSuchModel'"):
        pnn.NoSuchModel
