"""The usual CLIP example: CLIPTransform -> DataLoader over synthetic pairs -> clip_tiny ->
contrastive loss -> AdamW, written functionally and with the shell; the loss goes down and the
two versions take the same steps."""

import torch
from torch.utils.data import DataLoader, Dataset

from polymodal import nn as pnn
from polymodal.core import pytree
from polymodal.core import random as pr
from polymodal.core.losses import contrastive_loss_with_temperature
from polymodal.data import CLIPImageTransform, CLIPTokenizer, CLIPTransform, SyntheticCaptions
from polymodal.models.clip import build


class ShapesAsImages(Dataset):
    """Synthetic (uint8 image, caption) pairs put through a pair transform, as a real dataset would be."""

    def __init__(self, n: int, transform) -> None:
        self.data = SyntheticCaptions("train", size=n, image_size=72, seed=0)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        item = self.data[i]
        return self.transform((item["image"] * 255).round().to(torch.uint8), item["caption"])


def loader() -> DataLoader:
    spec = build("clip_tiny")
    transform = CLIPTransform(CLIPImageTransform(spec.image_size), CLIPTokenizer(context_length=spec.context_length))
    return DataLoader(ShapesAsImages(48, transform), batch_size=16, shuffle=True,
                      generator=torch.Generator().manual_seed(0))


def contrastive(out):
    return contrastive_loss_with_temperature(out.image_embeddings, out.text_embeddings, out.logit_scale).loss


def test_usual_example_functional_and_shell_take_the_same_steps_and_learn():
    data = loader()
    images, tokens = next(iter(data))
    assert images.shape == (16, 3, 64, 64) and tokens.shape == (16, 32)
    fixed = (images, tokens)

    spec = build("clip_tiny")
    params = spec.init(key=pr.key(0))
    for leaf in pytree.leaves(params):
        leaf.requires_grad_(True)
    opt = torch.optim.AdamW(pytree.leaves(params), lr=1e-3, weight_decay=0.1)

    model = pnn.CLIP("clip_tiny", key=pr.key(0)).train()
    shell_opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)

    with torch.no_grad():
        before = float(contrastive(spec(params, *fixed)))
    losses, shell_losses = [], []
    for _ in range(8):
        for images, tokens in data:
            loss = contrastive(spec(params, images, tokens))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss))

            shell_loss = contrastive(model(images, tokens))
            shell_opt.zero_grad()
            shell_loss.backward()
            shell_opt.step()
            shell_losses.append(float(shell_loss))
    with torch.no_grad():
        after = float(contrastive(spec(params, *fixed)))
        model.eval()
        shell_after = float(contrastive(model(*fixed)))
    torch.testing.assert_close(torch.tensor(shell_losses), torch.tensor(losses), rtol=1e-4, atol=1e-5)
    assert after < before - 0.3, (before, after, losses)
    assert abs(shell_after - after) < 1e-3


def test_training_batches_are_trimmed_to_the_longest_caption_with_the_same_loss():
    from polymodal.models.clip.task import Collate, clip_loss

    data = SyntheticCaptions("train", 32, image_size=64, seed=3)
    items = [data[i] for i in range(8)]
    full, trimmed = Collate(32, trim=False)(items), Collate(32)(items)
    width = int(full["tokens"].argmax(-1).max()) + 1
    assert full["tokens"].shape == (8, 32) and trimmed["tokens"].shape == (8, -(-width // 8) * 8) and width < 24
    assert torch.equal(trimmed["tokens"], full["tokens"][:, :trimmed["tokens"].shape[1]])
    assert torch.equal(trimmed["images"], full["images"]) and torch.equal(trimmed["labels"], full["labels"])
    spec = build("clip_tiny")
    params = spec.init(key=pr.key(0))
    loss_full, _ = clip_loss(spec, params, full, None)
    loss_trim, _ = clip_loss(spec, params, trimmed, None)
    torch.testing.assert_close(loss_trim, loss_full, rtol=1e-5, atol=1e-6)
