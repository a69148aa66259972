"""``polymodal classify --run DIR --video clip.mp4`` / ``--image img.png``: an Omnivore run's top classes.

Videos are decoded with PyAV (``pip install av``; torchvision >= 0.25 has no ``read_video``);
every frame is read, the centre clip is sampled as in evaluation and resized to the run's frame
size; images are resized (shorter side) and centre-cropped. Both then go through the run's
task's own preprocessing (``OmnivoreTask.collate``), so a file is seen as training data was.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import torch
from torch import Tensor
from torchvision.transforms import v2

__all__ = ["add_classify_parser", "classify_command", "read_video", "read_image"]


def add_classify_parser(sub: Any) -> None:
    """The ``classify`` sub-command on ``polymodal``'s sub-parsers."""
    c = sub.add_parser("classify", help="classify a video or an image with an Omnivore run",
                       description="Top classes of a video (--video) or an image (--image) from a run of "
                                   "'polymodal train omnivore'.")
    c.add_argument("--run", required=True, help="run directory written by 'polymodal train omnivore'")
    what = c.add_mutually_exclusive_group(required=True)
    what.add_argument("--video", help="video file (MP4, AVI, WebM, ...; decoded with PyAV)")
    what.add_argument("--image", help="image file (PNG, JPEG, ...)")
    c.add_argument("--top", type=int, default=3, help="classes to print (default: %(default)s)")


def _error(msg: str) -> Exception:
    from ...cli import CLIError

    return CLIError(msg)


def read_video(path: str | os.PathLike) -> Tensor:
    """Every frame of a video file as ``(T, 3, H, W)`` uint8 (RGB), decoded with PyAV."""
    try:
        import av
    except ImportError:
        raise _error("--video: decoding needs PyAV: pip install av (or polymodal[video])") from None
    if not os.path.isfile(path):
        raise _error(f"--video: no such file {str(path)!r}")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError("it has no video stream")
            frames = [torch.from_numpy(f.to_ndarray(format="rgb24")) for f in container.decode(video=0)]
    except Exception as e:  # PyAV raises its own error types for unreadable files
        raise _error(f"--video: cannot read {str(path)!r} as a video ({e})") from None
    if not frames:
        raise _error(f"--video: {str(path)!r} has no decodable frames; expected a video with at least one frame")
    return torch.stack(frames).permute(0, 3, 1, 2).contiguous()


def read_image(path: str | os.PathLike) -> Tensor:
    """An image file as ``(3, H, W)`` uint8 (RGB)."""
    if not os.path.isfile(path):
        raise _error(f"--image: no such file {str(path)!r}")
    try:
        from ...data import load_image

        image = load_image(str(path))
    except Exception as e:  # PIL raises many types for unreadable files
        raise _error(f"--image: cannot read {str(path)!r} as an image ({e})") from None
    return v2.functional.pil_to_tensor(image)


def _fit(x: Tensor, size: int) -> Tensor:
    """``(..., 3, H, W)`` uint8 -> float in [0, 1], shorter side ``size``, centre ``size x size``."""
    x = v2.functional.to_dtype(x, torch.float32, scale=True)
    x = v2.functional.resize(x, [size], antialias=True)
    return v2.functional.center_crop(x, [size, size]).clamp(0.0, 1.0)


def classify_command(args: argparse.Namespace) -> int:
    """Print the run's top ``args.top`` classes for ``args.video`` or ``args.image``."""
    from ...train.runs import load_run, run_task
    from .model import Omnivore

    if args.top < 1:
        raise _error(f"--top: expected a positive number, got {args.top}")
    x = read_video(args.video) if args.video else read_image(args.image)  # file errors before loading the run
    model, params, cfg, _ = load_run(args.run)
    if not isinstance(model, Omnivore):
        raise _error(f"--run: {args.run!r} is a {cfg.get('family')!r} run; expected an Omnivore run "
                     "('polymodal train omnivore')")
    task = run_task(args.run)
    size = task.options.image_size
    if args.video:
        modality, item = "video", {"video": _fit(x, size).transpose(0, 1), "label": 0}  # (3, T, S, S)
    else:
        modality, item = "image", {"image": _fit(x, size), "label": 0}
    batch = task.collate(modality, [item], None)
    with torch.no_grad():
        probs = model(params, batch["x"], modality).logits.softmax(-1)[0]
    names = task.class_names(modality)
    for i in probs.argsort(descending=True)[: args.top].tolist():
        print(f"{probs[i].item():7.2%}  {names[i]}")
    return 0
