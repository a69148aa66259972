"""``polymodal generate --run RUN "a blue square moves up"``: sample videos from a text-to-video GPT run
and write them as an animated GIF or an MP4 grid (one row per prompt, ``--num-samples`` columns).

Sampling uses the KV cache (``polymodal.core.encoders.gpt_generate.generate``) with top-k / top-p /
temperature from explicit keys (``--seed``); the VQ-VAE of the GPT run's ``--vqvae`` decodes the codes.
``--rerank RUN`` orders each prompt's samples by a ``polymodal train videoclip`` run's text-video similarity,
best first (as DALL-E reranks its samples with CLIP), and ``--keep K`` keeps the best K.
"""

from __future__ import annotations

import argparse
from fractions import Fraction
from pathlib import Path

import torch
from torch import Tensor

from ...core import random as pr
from ...core.encoders.gpt_generate import generate
from ...core.pytree import atomic_write

__all__ = ["add_generate_parser", "generate_command", "rerank", "sample_videos", "write_gif_grid", "write_mp4_grid",
           "write_video_grid"]


def add_generate_parser(sub) -> None:
    """The ``generate`` subcommand's parser (called by ``polymodal.cli``)."""
    g = sub.add_parser("generate", help="sample videos from a text-to-video GPT run",
                       description="Sample videos for text prompts from a 'polymodal train video-gpt' run; writes an "
                                   "animated GIF or an MP4 grid (one row per prompt).")
    g.add_argument("--run", required=True, help="run directory written by 'polymodal train video-gpt'")
    g.add_argument("prompts", nargs="+", help="captions, e.g. \"a blue square moves up\"")
    g.add_argument("--num-samples", type=int, default=4, help="videos per prompt (default: %(default)s)")
    g.add_argument("--top-k", type=int, default=None, help="sample among the k most likely codes")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass")
    g.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (0: greedy)")
    g.add_argument("--seed", type=int, default=0, help="seed of the sampling keys")
    g.add_argument("--scale", type=int, default=3, help="pixel magnification in the grid (default: %(default)s)")
    g.add_argument("--output", default=None, help="a .gif (Pillow) or .mp4 (H.264, PyAV) path "
                                                  "(default: RUN/samples.gif)")
    g.add_argument("--rerank", default=None, metavar="RUN",
                   help="order each prompt's samples by this 'polymodal train videoclip' run's similarity, best first")
    g.add_argument("--keep", type=int, default=None, help="with --rerank: keep each prompt's best K samples")


@torch.no_grad()
def sample_videos(task, params, prompts: list[str], *, num_samples: int = 4, key: Tensor | None = None,
                  top_k: int | None = None, top_p: float | None = None, temperature: float = 1.0,
                  use_cache: bool = True, progress: bool | None = None) -> Tensor:
    """``(len(prompts), num_samples, 3, T, H, W)`` videos in [0, 1] sampled from a video-gpt task's model;
    ``progress``: a bar over the sampled codes (None: on a terminal only)."""
    text = task.tokenizer.encode(prompts, strict=True).repeat_interleave(num_samples, 0)
    codes = generate(task.model, params, text, key=key, top_k=top_k, top_p=top_p, temperature=temperature,
                     use_cache=use_cache, progress=progress)
    codes = codes.reshape(codes.shape[0], *task.model.out_shape)
    videos = (task.vqvae.decode(task.vq_params, codes, task.vq_state) + 0.5).clamp(0, 1)
    return videos.reshape(len(prompts), num_samples, *videos.shape[1:])


VIDEO_SUFFIXES = (".gif", ".mp4")


def _grid(videos: Tensor, scale: int, pad: int, even: bool = False):
    """``videos (rows, cols, 3, T, H, W)`` in [0, 1] -> ``(T, H', W', 3)`` uint8 frames (NumPy): frame t of every
    video side by side on a white grid; ``even``: H' and W' rounded up to even (H.264's 4:2:0 needs it)."""
    rows, cols, _, frames, h, w = videos.shape
    hh, ww = h * scale, w * scale
    height, width = rows * (hh + pad) + pad, cols * (ww + pad) + pad
    if even:
        height, width = height + height % 2, width + width % 2
    canvas = torch.ones(frames, 3, height, width)
    big = videos.repeat_interleave(scale, -2).repeat_interleave(scale, -1)  # (R, C, 3, T, hh, ww)
    for r in range(rows):
        for c in range(cols):
            y, x = pad + r * (hh + pad), pad + c * (ww + pad)
            canvas[:, :, y:y + hh, x:x + ww] = big[r, c].transpose(0, 1)
    return (canvas.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()


@torch.no_grad()
def rerank(task, params, state, prompts: list[str], videos: Tensor) -> tuple[Tensor, Tensor]:
    """Score ``videos (len(prompts), N, 3, T, H, W)`` in [0, 1] against their prompts with a VideoCLIP task's
    model: the cosine similarities ``(len(prompts), N)`` of the text and video embeddings, and each row's
    order, best first."""
    p, n = videos.shape[:2]
    text = task.model.encode_text(params, task.vocab.encode(prompts, task.options.text_length))  # (P, E)
    video = task.model.encode_video(params, videos.flatten(0, 1), state=state).reshape(p, n, -1)  # (P, N, E)
    scores = torch.einsum("pe,pne->pn", text, video)
    return scores, scores.argsort(dim=1, descending=True, stable=True)


def write_gif_grid(videos: Tensor, path: str | Path, *, scale: int = 3, pad: int = 2, duration_ms: int = 150) -> Path:
    """Write ``videos (rows, cols, 3, T, H, W)`` in [0, 1] as one animated GIF (Pillow), frame t of every
    video side by side on a white grid. Written atomically: an interrupted write leaves ``path`` as it was."""
    from PIL import Image

    imgs = [Image.fromarray(a) for a in _grid(videos, scale, pad)]
    path = Path(path)
    atomic_write(path, lambda tmp: imgs[0].save(tmp, format="GIF", save_all=True, append_images=imgs[1:],
                                                 duration=duration_ms, loop=0))
    return path


def write_mp4_grid(videos: Tensor, path: str | Path, *, scale: int = 3, pad: int = 2, duration_ms: int = 150) -> Path:
    """:func:`write_gif_grid` as an H.264 MP4 (PyAV; ``pip install av`` or ``polymodal[video]``), each frame shown
    ``duration_ms``; the grid is padded by a white pixel where its height or width is odd. Written atomically."""
    try:
        import av
    except ImportError:
        raise ValueError(f"--output {str(path)!r}: writing MP4 needs PyAV: pip install av (or polymodal[video]); "
                         f"or write a .gif") from None
    frames = _grid(videos, scale, pad, even=True)
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"

    def write(tmp: str) -> None:
        with av.open(tmp, "w", format="mp4") as container:
            stream = container.add_stream(codec, rate=Fraction(1000, duration_ms))
            stream.height, stream.width, stream.pix_fmt = frames.shape[1], frames.shape[2], "yuv420p"
            for a in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(a, format="rgb24")))
            container.mux(stream.encode())  # flush the encoder

    path = Path(path)
    atomic_write(path, write)
    return path


def _video_suffix(path: str | Path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in VIDEO_SUFFIXES:
        raise ValueError(f"--output {str(path)!r}: expected a path ending in .gif or .mp4, got "
                         f"{suffix or 'no suffix'!r}")
    return suffix


def write_video_grid(videos: Tensor, path: str | Path, **kwargs) -> Path:
    """:func:`write_gif_grid` or :func:`write_mp4_grid` by ``path``'s suffix (``.gif``, ``.mp4``)."""
    return (write_gif_grid if _video_suffix(path) == ".gif" else write_mp4_grid)(videos, path, **kwargs)


def generate_command(args: argparse.Namespace) -> int:
    """Run ``polymodal generate``; prints where the grid went. Bad input (a prompt longer than the
    text context, a run of another family) is one line on stderr, exit status 2."""
    from ...cli import CLIError

    try:
        return _generate(args)
    except ValueError as e:
        raise CLIError(str(e)) from e


def _generate(args: argparse.Namespace) -> int:
    from ...train.runs import load_run, run_task

    task = run_task(args.run)
    if task.run_config.get("family") != "video-gpt":
        raise ValueError(f"--run {args.run}: expected a 'video-gpt' run, got {task.run_config.get('family')!r}")
    if args.num_samples < 1:
        raise ValueError(f"--num-samples: expected an int >= 1, got {args.num_samples}")
    output = Path(args.output or Path(args.run) / "samples.gif")
    _video_suffix(output)  # bad arguments fail before the sampling, not after it
    judge = None if args.rerank is None else run_task(args.rerank)
    if judge is not None and judge.run_config.get("family") != "videoclip":
        raise ValueError(f"--rerank {args.rerank}: expected a 'videoclip' run, got {judge.run_config.get('family')!r}")
    if judge is not None:  # the sampled clips' shape against the VideoCLIP's video encoder
        try:
            judge.model.video.check_video(torch.empty(1, 3, task.frames, task.image_size, task.image_size,
                                                      device="meta"))
        except ValueError as e:
            raise ValueError(f"--rerank {args.rerank}: {e}") from None
    if args.keep is not None and (judge is None or not 1 <= args.keep <= args.num_samples):
        raise ValueError(f"--keep: expected an int from 1 to --num-samples ({args.num_samples}) with --rerank, got "
                         f"{args.keep}" + ("" if judge is not None else " without --rerank"))
    run = load_run(args.run)
    videos = sample_videos(task, run.params, args.prompts, num_samples=args.num_samples, key=pr.key(args.seed),
                           top_k=args.top_k, top_p=args.top_p, temperature=args.temperature)
    if judge is not None:
        vc = load_run(args.rerank)
        scores, order = rerank(judge, vc.params, vc.state, args.prompts, videos)
        order = order[:, :args.keep]
        videos = videos[torch.arange(len(args.prompts))[:, None], order]
        for prompt, row in zip(args.prompts, scores.gather(1, order).tolist()):
            print(f"{prompt!r}: VideoCLIP similarity " + " ".join(f"{x:.3f}" for x in row))
    out = write_video_grid(videos, output, scale=args.scale)
    print(f"wrote {len(args.prompts)} x {videos.shape[1]} sampled videos ({videos.shape[3]} frames of "
          f"{videos.shape[4]}x{videos.shape[5]}) to {out}" + (", best first" if judge is not None else ""))
    return 0
