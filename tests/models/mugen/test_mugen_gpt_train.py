"""The loop end to end: ``train vqvae`` -> ``train video-gpt --vqvae RUN`` -> ``generate`` (GIF or MP4 grid)."""

import pytest
import torch
from PIL import Image

from polymodal.cli import main
from polymodal.core import random as pr
from polymodal.models.mugen import cli as mugen_cli
from polymodal.models.mugen.cli import rerank, sample_videos, write_video_grid
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


def test_generation_writes_an_mp4_grid(runs, capsys):
    av = pytest.importorskip("av")
    d, _, _ = runs
    out = d / "samples.mp4"
    assert main(["generate", "--run", str(d / "gpt"), "a blue square moves up", "--num-samples", "2",
                 "--output", str(out), "--scale", "1"]) == 0
    assert f"to {out}" in capsys.readouterr().out
    with av.open(str(out)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 8 and frames[0].shape == (36, 70, 3)  # one row of two 32x32 videos, 2 px gaps


def test_mp4_grid_holds_the_videos_and_even_sides(tmp_path):
    av = pytest.importorskip("av")
    videos = torch.zeros(1, 2, 3, 6, 15, 15)
    videos[0, 0, 0] = 1.0  # a red clip beside a blue one
    videos[0, 1, 2] = 1.0
    write_video_grid(videos, tmp_path / "g.mp4", scale=2)
    with av.open(str(tmp_path / "g.mp4")) as container:
        frames = [torch.from_numpy(f.to_ndarray(format="rgb24")).float() for f in container.decode(video=0)]
    assert len(frames) == 6 and frames[0].shape == (34, 66, 3)  # 2 + 30 + 2 = 34 rows; 2 + 2 x 32 = 66 columns
    red, blue = frames[3][17, 17], frames[3][17, 49]  # centres of the two clips (lossy codec: near, not equal)
    assert (red - torch.tensor([255.0, 0, 0])).abs().max() < 40
    assert (blue - torch.tensor([0, 0, 255.0])).abs().max() < 40


def test_video_grid_output_is_checked_first_and_written_atomically(runs, tmp_path, capsys, monkeypatch):
    d, _, _ = runs
    calls = []
    monkeypatch.setattr(mugen_cli, "sample_videos", lambda *a, **k: calls.append(1))
    assert main(["generate", "--run", str(d / "gpt"), "a blue square moves up",
                 "--output", str(tmp_path / "s.avi")]) == 2
    assert "expected a path ending in .gif or .mp4, got '.avi'" in capsys.readouterr().err
    assert calls == [] and not (tmp_path / "s.avi").exists()  # refused before any sampling
    # a write that fails half-way leaves the earlier file as it was, and no temporary file
    videos = torch.rand(1, 1, 3, 4, 8, 8)
    gif = write_video_grid(videos, tmp_path / "s.gif")
    before = gif.read_bytes()

    def fail(self, fp, *a, **k):
        with open(fp, "wb") as f:
            f.write(b"GIF89a")  # the start of a file, then the disk fills
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        write_video_grid(torch.rand(1, 1, 3, 4, 8, 8), gif)
    assert gif.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["s.gif"]


@pytest.fixture(scope="module")
def videoclip_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("videoclip") / "vc"
    cfg = LoopConfig(steps=2, batch_size=8, eval_every=0, save_every=0, out=str(d), progress=False)
    train(make_task("videoclip", "tiny", {"train_size": 16, "eval_size": 8}, cfg), cfg)
    return d


def test_rerank_orders_each_prompts_samples_best_first(runs, videoclip_run, tmp_path, capsys):
    d, _, _ = runs
    prompts = ["a blue square moves up", "a red ring moves left"]
    out = tmp_path / "ranked.gif"
    assert main(["generate", "--run", str(d / "gpt"), *prompts, "--num-samples", "3", "--rerank", str(videoclip_run),
                 "--keep", "2", "--output", str(out), "--scale", "1", "--seed", "3"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[-1].startswith("wrote 2 x 2 sampled videos") and printed[-1].endswith("best first")
    assert Image.open(out).size == (2 * 34 + 2, 2 * 34 + 2)  # two rows of the two best
    # by hand: the same samples (same seed), scored with the VideoCLIP run's embeddings, best two of each row
    task, gpt = run_task(d / "gpt"), load_run(d / "gpt")
    videos = sample_videos(task, gpt.params, prompts, num_samples=3, key=pr.key(3))
    judge, vc = run_task(videoclip_run), load_run(videoclip_run)
    text = judge.model.encode_text(vc.params, judge.vocab.encode(prompts, judge.options.text_length))
    for i, prompt in enumerate(prompts):
        sims = [float(text[i] @ judge.model.encode_video(vc.params, videos[i, j:j + 1], state=vc.state)[0])
                for j in range(3)]
        head, values = printed[i].split(" similarity ")
        assert head == f"{prompt!r}: VideoCLIP"
        assert [float(v) for v in values.split()] == pytest.approx(sorted(sims)[::-1][:2], abs=1.5e-3)
    scores, order = rerank(judge, vc.params, vc.state, prompts, videos)
    assert torch.equal(scores.gather(1, order), scores.sort(1, descending=True).values)


def test_rerank_errors_name_what_was_expected(runs, videoclip_run, capsys):
    d, _, _ = runs
    gpt = str(d / "gpt")
    assert main(["generate", "--run", gpt, "a blue square moves up", "--rerank", gpt]) == 2
    assert "--rerank" in (err := capsys.readouterr().err) and "expected a 'videoclip' run, got 'video-gpt'" in err
    assert main(["generate", "--run", gpt, "a blue square moves up", "--keep", "1"]) == 2
    assert "--keep: expected an int from 1 to --num-samples (4) with --rerank, got 1 without --rerank" in \
        capsys.readouterr().err
    assert main(["generate", "--run", gpt, "a blue square moves up", "--num-samples", "2", "--keep", "3",
                 "--rerank", str(videoclip_run)]) == 2
    assert "--keep: expected an int from 1 to --num-samples (2) with --rerank, got 3" in capsys.readouterr().err


def test_rerank_checks_the_clip_shape_before_sampling(runs, videoclip_run, capsys, monkeypatch):
    from polymodal.core.encoders.s3d import S3D

    d, _, _ = runs
    seen, calls = [], []

    def too_small(self, video):  # the VideoCLIP task's own check at load passes; the GPT's clips then fail, as
        seen.append(tuple(video.shape))  # against a VideoCLIP whose encoder needs longer clips than the GPT samples
        if len(seen) > 1:
            raise ValueError("S3D: video of 8 frames of 32x32 gives a (1, 1, 1) feature map, smaller than the pool")

    monkeypatch.setattr(S3D, "check_video", too_small)
    monkeypatch.setattr(mugen_cli, "sample_videos", lambda *a, **k: calls.append(1))
    assert main(["generate", "--run", str(d / "gpt"), "a blue square moves up", "--rerank", str(videoclip_run)]) == 2
    assert f"--rerank {videoclip_run}: S3D: video of 8 frames of 32x32" in capsys.readouterr().err
    assert seen[-1] == (1, 3, 8, 32, 32) and calls == []  # the GPT's clip shape, checked before any sampling
