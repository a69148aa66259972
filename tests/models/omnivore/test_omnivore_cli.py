"""``polymodal classify --run DIR --video clip.mp4 / --image img.png`` on a (two-step) Omnivore run;
the clip is written here with PyAV, the library the command decodes with."""

import numpy as np
import pytest
import torch

av = pytest.importorskip("av")

from polymodal.cli import main  # noqa: E402
from polymodal.data.motion import render_video  # noqa: E402
from polymodal.core import random as pr  # noqa: E402
from polymodal.models.omnivore.cli import read_video  # noqa: E402
from polymodal.train import LoopConfig, make_task  # noqa: E402
from polymodal.train.loop import train  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("omnivore") / "run"
    task = make_task("omnivore", "tiny", {"train_size": 24, "eval_size": 3},
                     LoopConfig(steps=1, batch_size=12, eval_every=0, save_every=0, out=str(out), progress=False))
    train(task, LoopConfig(steps=1, batch_size=12, eval_every=0, save_every=0, out=str(out), progress=False))
    return out


def write_clip(path, frames):
    """``frames (T, H, W, 3)`` uint8 -> an MPEG-4 file."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_video_is_decoded_and_classified(run, tmp_path, capsys):
    video = render_video(pr.key(0), {"shape": "circle", "color": "red", "direction": "left"}, 8, 48, background="dark")
    frames = (video.permute(1, 2, 3, 0) * 255).round().to(torch.uint8).numpy()  # (T, H, W, 3)
    clip = tmp_path / "clip.mp4"
    write_clip(clip, np.ascontiguousarray(frames))
    decoded = read_video(clip)
    assert decoded.shape == (8, 3, 48, 48) and decoded.dtype == torch.uint8
    assert (decoded.float() - torch.from_numpy(frames).permute(0, 3, 1, 2).float()).abs().mean() < 12  # lossy codec
    assert main(["classify", "--run", str(run), "--video", str(clip), "--top", "4"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert sorted(line.split("moves ")[1] for line in lines) == ["down", "left", "right", "up"]
    assert abs(sum(float(line.split("%")[0]) for line in lines) - 100) < 0.1


def test_image_is_classified(run, tmp_path, capsys):
    from PIL import Image

    path = tmp_path / "img.png"
    Image.fromarray(np.full((40, 50, 3), 128, dtype=np.uint8)).save(path)
    assert main(["classify", "--run", str(run), "--image", str(path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and all("%" in line for line in lines)


def test_unreadable_or_missing_files_are_clear_errors(run, tmp_path, capsys):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all" * 10)
    assert main(["classify", "--run", str(run), "--video", str(bad)]) == 2
    assert f"--video: cannot read {str(bad)!r} as a video" in capsys.readouterr().err
    assert main(["classify", "--run", str(run), "--video", str(tmp_path / "nope.mp4")]) == 2
    assert "--video: no such file" in capsys.readouterr().err
    bad_img = tmp_path / "bad.png"
    bad_img.write_bytes(b"\x89PNG nonsense")
    assert main(["classify", "--run", str(run), "--image", str(bad_img)]) == 2
    assert "--image: cannot read" in capsys.readouterr().err
