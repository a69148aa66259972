"""polymodal.nn shells of the FLAVA specs (from the registry): state_dict keys, forward == spec, methods."""

import torch

import polymodal.nn as pnn
from polymodal.core.pytree import flatten


def test_shells():
    shell = pnn.build("flava_tiny_for_pretraining").eval()
    params = shell.params
    assert sorted(shell.state_dict()) == sorted(flatten(params))
    image, text = torch.rand(2, 3, 32, 32), torch.tensor([[2, 9, 7, 3], [2, 5, 3, 0]])
    out = shell(image, text, text_masked=text, itm_labels=torch.tensor([1, 1]))
    want = shell.spec(params, image, text, text_masked=text, itm_labels=torch.tensor([1, 1]))
    torch.testing.assert_close(out.losses.total, want.losses.total)
    torch.testing.assert_close(shell.encode_image(image), shell.spec.encode_image(params, image))
    clf = pnn.build("flava_tiny_for_classification", num_classes=3).eval()
    assert clf(image, text).shape == (2, 3)
