"""The loop end to end: ``train vqvae`` -> ``train video-gpt --vqvae RUN`` -> ``generate`` (GIF grid)."""

import pytest
import torch
from PIL import Image

from polymodal.cli import main
from polymodal.core import random as pr
from polymodal.models.mugen.cli import sample_videos
from polymodal.train import LoopConfig, make_task
from polymodal.train.loop import train
from polymodal.train.runs import load_run, run_task


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("mugen")
    cfg = LoopConfig(steps=2, batch_size=4, eval_every=0, save_every=0, out=str(d / "vq"), progress=False)
    vq_metrics = train(make_task("vqvae", "tiny", {"train_size": 8, "eval_size": 4}, cfg), cfg)
    cfg2 = LoopConfig(steps=3, batch_size=4, eval_every=0, save_every=0, out=str(d / "gpt"), progress=False, lr=1e-3)
    task = make_task("video-gpt", "tiny", {"vqvae": str(d / "vq"), "train_size": 8, "eval_size": 4}, cfg2)
    gpt_metrics = train(task, cfg2)
    return d, vq_metrics, gpt_metrics


def test_vqvae_run_reports_psnr_and_codebook_usage(runs):
    d, vq, _ = runs
    assert set(vq) == {"eval/psnr", "eval/codebook_usage", "eval/perplexity"}
    assert 5 < vq["eval/psnr"] < 60 and 0 < vq["eval/codebook_usage"] <= 1
    r = load_run(d / "vq")
    assert bool(r.state["codebook"]["initialized"])  # the EMA codebook is saved as model state
    assert int(r.state["encoder"]["res_norm"]["num_batches_tracked"]) == 2


def test_video_gpt_run_and_generation_writes_a_gif_grid(runs, capsys):
    d, _, gpt = runs
    assert gpt["eval/video_nll"] > 0
    out = d / "samples.gif"
    assert main(["generate", "--run", str(d / "gpt"), "a blue square moves up", "a red ring moves left",
                 "--num-samples", "2", "--top-k", "5", "--output", str(out), "--scale", "1"]) == 0
    assert "wrote 2 x 2 sampled videos (8 frames of 32x32)" in capsys.readouterr().out
    gif = Image.open(out)
    assert gif.n_frames == 8 and gif.size == (2 * 34 + 2, 2 * 34 + 2)
    # the same key gives the same videos, another key others
    task, run = run_task(d / "gpt"), load_run(d / "gpt")

    def draw(k):
        return sample_videos(task, run.params, ["a green cross moves down"], num_samples=1, key=pr.key(k))

    a = draw(1)
    assert a.shape == (1, 1, 3, 8, 32, 32) and torch.equal(a, draw(1)) and not torch.equal(a, draw(2))


def test_generation_errors_name_what_was_expected(runs, capsys):
    d, _, _ = runs
    long = "a blue square moves up and then down and then left"
    assert main(["generate", "--run", str(d / "gpt"), long]) == 2
    assert "the text context holds at most 8" in capsys.readouterr().err
    assert main(["generate", "--run", str(d / "vq"), "a blue square moves up"]) == 2
    assert "expected a 'video-gpt' run, got 'vqvae'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--vqvae RUN is required"):
        make_task("video-gpt", "tiny", {}, LoopConfig(steps=1))
