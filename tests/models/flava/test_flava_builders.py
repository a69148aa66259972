"""FLAVA builders: parameter counts equal TorchMultimodal's (counted from its modules on the meta device:
``flava_model(**cfg)`` + ``DalleVAEEncoder`` + ``FLAVAPretrainingLoss``), configurations built on meta."""

import pytest

from polymodal.core.convert import meta_init
from polymodal.core.pytree import flatten
from polymodal.models.flava import build
from polymodal.registry import family


def _count(spec) -> int:
    return sum(v.numel() for v in flatten(meta_init(spec)).values())


# TorchMultimodal 2024.4.1 on the meta device (see the module docstring).
COUNTS = {
    "flava_model": 241_356_288,
}
SCALE_COUNTS = {  # slow: the meta init of 0.36-10 B parameters takes 5-20 s each on 2 loaded CPU cores
    "flava_model_for_pretraining": 357_645_303,
    "flava_900m": 933_785_335,
    "flava_1_8b": 1_786_520_567,
    "flava_2_7b": 2_754_991_223,
    "flava_4_8b": 4_869_660_535,
    "flava_10b": 10_192_950_007,
}


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_parameter_counts_equal_torchmultimodal(name):
    assert _count(build(name)) == COUNTS[name]


@pytest.mark.slow  # the meta init of 1-10 B parameters takes 5-20 s each on 2 CPU cores
@pytest.mark.parametrize("name", sorted(SCALE_COUNTS))
def test_scale_parameter_counts_equal_torchmultimodal(name):
    assert _count(build(name)) == SCALE_COUNTS[name]


@pytest.mark.slow
def test_classification_count():
    assert _count(build("flava_model_for_classification", num_classes=10)) == 241_954_570


def test_registered():
    fam = family("flava")
    assert fam.presets["tiny"] == "flava_tiny_for_pretraining"
    with pytest.raises(ValueError, match="unknown FLAVA builder"):
        build("flava_huge")


def test_a_conv_stem_has_no_reference_layout():
    """``image_conv_stem`` (the tiny task's option) has no TorchMultimodal / transformers weights: converting
    such a model names the stem instead of writing a state dict with a mis-shaped patch projection."""
    from polymodal.core import random as pr
    from polymodal.models.flava import flava_tiny
    from polymodal.models.flava.convert import to_torchmultimodal
    from polymodal.models.flava.hf import huggingface_table

    spec = flava_tiny(image_conv_stem=(8,))
    with pytest.raises(ValueError, match=r"conv stem \(conv_stem=\(8,\)\), which TorchMultimodal's FLAVA has no"):
        to_torchmultimodal(spec.init(key=pr.key(0)), spec)
    with pytest.raises(ValueError, match="which transformers' FLAVA has no weights"):
        huggingface_table(spec)
