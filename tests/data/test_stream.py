"""ShardStream: WebDataset shards as a resumable stream of per-rank batches."""

import json
import tarfile
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from PIL import Image
from torch.utils.data import DataLoader

wds = pytest.importorskip("webdataset")

from polymodal.data import BadSampleError, CLIPImageTransform  # noqa: E402
from polymodal.data.stream import ShardStream, expand_shards, is_shard_pattern  # noqa: E402

SIZES = (5, 7, 4)  # 16 samples


def _colour(key: str) -> tuple[int, int, int]:
    n = int(key[1:])
    return (n * 13 % 256, n * 29 % 256, n * 71 % 256)


def _write(folder: Path, sizes=SIZES, name="shard-{:06d}.tar", bad=None, noise=False) -> list[str]:
    """Shards of tiny PNGs whose colour encodes the key (or noise); captions alternate .txt / .json."""
    urls, n = [], 0
    for s, size in enumerate(sizes):
        url = str(folder / name.format(s))
        with wds.TarWriter(url) as sink:
            for _ in range(size):
                key = f"k{n:03d}"
                image = Image.new("RGB", (6, 4), _colour(key))
                if noise:
                    image = Image.fromarray(np.random.default_rng(n).integers(0, 256, (12, 12, 3), dtype=np.uint8))
                fields = {"png": image}
                fields |= {"txt": f"caption {key}"} if n % 2 else {"json": {"caption": f"caption {key}"}}
                fields = (bad or {}).get(key, fields)
                sink.write({"__key__": key, **fields})
                n += 1
        urls.append(url)
    return urls


@pytest.fixture
def shards(tmp_path):
    _write(tmp_path)
    return str(tmp_path / "shard-{000000..000002}.tar")


def _caption(im, cap):
    return cap


def _loader(stream, workers):
    return DataLoader(stream, batch_size=None, num_workers=workers, collate_fn=list)


def test_epoch_visits_every_sample_once_over_two_ranks_and_two_workers(shards):
    every = sorted(f"caption k{n:03d}" for n in range(16))
    seen = {}
    for rank in range(2):
        stream = ShardStream(shards, batch_size=4, num_samples=16, key=3, stop_step=8, rank=rank, world=2,
                             pair_transform=_caption)
        batches = list(_loader(stream, workers=2))
        assert batches == [stream.batch(s) for s in range(8)]  # the loader interleaves the workers in step order
        assert all(len(b) == 2 for b in batches)
        seen[rank] = batches
    for epoch in range(2):
        steps = range(4 * epoch, 4 * epoch + 4)
        got = [c for s in steps for r in range(2) for c in seen[r][s]]
        assert sorted(got) == every  # each sample exactly once per epoch
    assert [c for r in range(2) for c in seen[r][0]] != [c for r in range(2) for c in seen[r][4]]  # reshuffled
    single = ShardStream(shards, batch_size=4, num_samples=16, key=3, pair_transform=_caption)
    assert [single.batch(s) for s in range(8)] == [seen[0][s] + seen[1][s] for s in range(8)]  # same global batches


def test_resume_at_step_k_equals_the_uninterrupted_stream(shards):
    mk = lambda start, **kw: ShardStream(shards, batch_size=6, num_samples=14, key=7, start_step=start, stop_step=9,  # noqa: E731
                                         transform=lambda im: torch.tensor(im.getpixel((0, 0))), **kw)
    full = list(_loader(mk(0), workers=0))
    assert len(full) == 9 and mk(0).steps_per_epoch == 2
    for k in (1, 2, 5, 8):
        resumed = list(_loader(mk(k), workers=2))
        assert len(resumed) == 9 - k
        for a, b in zip(full[k:], resumed):
            assert [c for _, c in a] == [c for _, c in b]
            assert torch.equal(torch.stack([x for x, _ in a]), torch.stack([x for x, _ in b]))
    for k in (3, 4):  # a resumed rank of two
        ranks = [list(_loader(mk(k, rank=r, world=2), workers=2)) for r in range(2)]
        assert [[c for _, c in a + b] for a, b in zip(*ranks)] == [[c for _, c in x] for x in full[k:]]


def test_items_decode_image_and_caption_from_txt_and_json(shards):
    stream = ShardStream(shards, batch_size=16, num_samples=16, key=0, shuffle_in_shard=False,
                         transform=lambda im: im)
    items = stream.batch(0)
    assert sorted(c for _, c in items) == sorted(f"caption k{n:03d}" for n in range(16))
    for im, cap in items:
        assert im.size == (6, 4) and im.mode == "RGB"
        assert im.getpixel((3, 2)) == _colour(cap.split()[-1])  # PNG: lossless
    clip = ShardStream(shards, batch_size=4, num_samples=16, key=0, transform=CLIPImageTransform(8, is_train=True))
    assert [tuple(x.shape) for x, _ in clip.batch(0)] == [(3, 8, 8)] * 4


def test_json_captions_take_caption_or_text_and_name_what_is_wrong(tmp_path):
    image = Image.new("RGB", (6, 4))
    bad = {"k000": {"png": image, "json": {"text": "from text"}}, "k001": {"png": image, "json": {"title": "x"}},
           "k002": {"png": image, "json": b"{not json"}}
    urls = _write(tmp_path, sizes=(3,), bad=bad)
    mk = lambda n: ShardStream(urls, batch_size=n, num_samples=n, key=0, shuffle_in_shard=False,  # noqa: E731
                               pair_transform=_caption)
    assert mk(1).batch(0) == ["from text"]
    with pytest.raises(BadSampleError, match=r"sample 'k001': json: expected an object with a 'caption' or 'text' "
                                             r"string, got \{'title': 'x'\}"):
        mk(2).batch(0)
    with pytest.raises(BadSampleError, match=r"sample 'k002': json: expected UTF-8 text holding JSON, got"):
        ShardStream(urls, batch_size=1, num_samples=3, key=0, shuffle_in_shard=False).batch(2)


def test_random_crops_are_reproducible_on_resume(tmp_path):
    _write(tmp_path, noise=True)
    shards = str(tmp_path / "shard-{000000..000002}.tar")
    crop = CLIPImageTransform(4, is_train=True, scale=(0.2, 0.5))
    mk = lambda start, **kw: ShardStream(shards, batch_size=4, num_samples=16, key=5, start_step=start, stop_step=6,  # noqa: E731
                                         transform=crop, **kw)
    full = [torch.stack([x for x, _ in b]) for b in _loader(mk(0), workers=0)]
    resumed = [torch.stack([x for x, _ in b]) for b in _loader(mk(3), workers=2)]
    assert all(torch.equal(a, b) for a, b in zip(full[3:], resumed))
    unseeded = [torch.stack([x for x, _ in b]) for b in _loader(mk(0, seeded_transforms=False), workers=0)]
    assert not all(torch.equal(a, b) for a, b in zip(full, unseeded))  # the crops are random: the seed matters


def test_shard_order_and_in_shard_order():
    with tempfile.TemporaryDirectory() as d:
        urls = _write(Path(d), sizes=(3, 3))
        stream = ShardStream(urls, batch_size=6, num_samples=6, key=1, shuffle_in_shard=False)
        keys = [k for _, k in stream.sample_ids(0)]
        assert keys in (["k000", "k001", "k002", "k003", "k004", "k005"], ["k003", "k004", "k005", "k000", "k001", "k002"])
        shuffled = ShardStream(urls, batch_size=6, num_samples=6, key=1)
        got = [k for _, k in shuffled.sample_ids(0)]
        assert sorted(got[:3]) == sorted(keys[:3]) and sorted(got[3:]) == sorted(keys[3:])  # whole shards in turn
        orders = {tuple(k for _, k in ShardStream(urls, batch_size=6, num_samples=6, key=s).sample_ids(0)) for s in range(12)}
        assert len(orders) > 4  # the order follows the key


def test_epoch_longer_than_the_shards_takes_a_second_pass(shards):
    stream = ShardStream(shards, batch_size=8, num_samples=24, key=2, pair_transform=_caption)
    got = [c for s in range(3) for c in stream.batch(s)]
    assert len(set(got[:16])) == 16  # the first pass: every sample once
    assert set(Counter(got).values()) <= {1, 2} and len(got) == 24


@settings(max_examples=8, deadline=None)
@given(sizes=st.lists(st.integers(0, 5), min_size=1, max_size=4).filter(lambda s: sum(s) >= 2),
       world=st.sampled_from([1, 2]), per_rank=st.integers(1, 3), seed=st.integers(0, 2**31))
def test_any_layout_partitions_the_epoch(sizes, world, per_rank, seed):
    batch = world * per_rank
    total = sum(sizes)
    if batch > total:
        batch, per_rank = world, 1
    with tempfile.TemporaryDirectory() as d:
        urls = _write(Path(d), sizes=sizes)
        steps = total // batch
        ids = [i for s in range(steps) for r in range(world)
               for i in ShardStream(urls, batch_size=batch, num_samples=total, key=seed, rank=r, world=world).sample_ids(s)]
        assert len(ids) == len(set(ids)) == steps * batch  # no duplicates, no gaps: a prefix of the permuted epoch
        one = ShardStream(urls, batch_size=batch, num_samples=total, key=seed)
        assert ids == [i for s in range(steps) for i in one.sample_ids(s)]


def test_brace_expansion_and_patterns(tmp_path):
    urls = _write(tmp_path, sizes=(1, 1, 1))
    assert expand_shards(str(tmp_path / "shard-{000000..000002}.tar")) == urls
    assert expand_shards(str(tmp_path / "shard-00000{0,2}.tar")) == [urls[0], urls[2]]
    assert expand_shards(f"{urls[0]}::{tmp_path}/shard-{{000001..000002}}.tar") == urls  # open_clip's "::"
    assert expand_shards(urls[1:]) == urls[1:]
    assert is_shard_pattern("d/{0..9}.tar") and is_shard_pattern("d/a.tar") and not is_shard_pattern("ann.jsonl")


def test_clear_errors(tmp_path):
    urls = _write(tmp_path, sizes=(2, 2))
    pattern = str(tmp_path / "nope-{0..3}.tar")
    with pytest.raises(FileNotFoundError, match=r"no shard matches '.*nope-\{0\.\.3\}\.tar' \(4 paths expanded"):
        ShardStream(pattern, batch_size=2, num_samples=4)
    with pytest.raises(FileNotFoundError, match=r"1 of the 3 shards of .* do not exist: .*shard-000002\.tar"):
        ShardStream(str(tmp_path / "shard-{000000..000002}.tar"), batch_size=2, num_samples=4)
    with pytest.raises(ValueError, match=r"--train-num-samples N"):
        ShardStream(urls, batch_size=2, num_samples=None)
    with pytest.raises(ValueError, match=r"expected local \(seekable\) tar files, got 'pipe:cat a.tar'"):
        ShardStream("pipe:cat a.tar", batch_size=2, num_samples=4)
    with pytest.raises(ValueError, match=r"num_samples: expected an int >= 4, got 3"):
        ShardStream(urls, batch_size=4, num_samples=3)
    with pytest.raises(ValueError, match=r"batch_size: expected a multiple of the 3 ranks, got 4"):
        ShardStream(urls, batch_size=4, num_samples=4, world=3)


def test_sizes_json_gives_the_epoch_and_is_checked(tmp_path):
    urls = _write(tmp_path, sizes=(2, 3))
    (tmp_path / "sizes.json").write_text(json.dumps({"shard-000000.tar": 2, "shard-000001.tar": 3}))
    stream = ShardStream(urls, batch_size=2, num_samples=None, key=0)
    assert stream.num_samples == 5 and stream.steps_per_epoch == 2
    (tmp_path / "sizes.json").write_text(json.dumps({"shard-000000.tar": 2, "shard-000001.tar": 4}))
    with pytest.raises(ValueError, match=r"sizes\.json says .*shard-000001\.tar holds 4 samples, got 3"):
        [ShardStream(urls, batch_size=2, num_samples=None, key=s).sample_ids(i) for s in range(4) for i in range(3)]


def test_bad_samples_raise_or_are_skipped_counted_and_replaced(tmp_path):
    broken = {"png": b"not a png", "txt": "broken"}
    no_caption = {"png": Image.new("RGB", (6, 4))}
    urls = _write(tmp_path, sizes=(4, 4), bad={"k001": broken, "k006": no_caption})
    mk = lambda **kw: ShardStream(urls, batch_size=4, num_samples=8, key=0, stop_step=2,  # noqa: E731
                                  pair_transform=_caption, shuffle_in_shard=False, **kw)
    with pytest.raises(BadSampleError, match=r"shard-000000\.tar: sample 'k001': png: cannot read image"):
        list(mk())
    with pytest.raises(BadSampleError, match=r"shard-000001\.tar: sample 'k006': no caption: expected one of \('txt', 'json'\), got \['png'\]"):
        ShardStream(urls[1], batch_size=4, num_samples=4).batch(0)
    stream = mk(skip_bad=True)
    batches = list(_loader(stream, workers=2))
    assert stream.num_skipped == 2
    # each bad one replaced by the next good one of its batch; the shards' order follows the key
    expect = [["caption k000", "caption k002", "caption k002", "caption k003"],
              ["caption k004", "caption k005", "caption k007", "caption k007"]]
    assert sorted(batches) == expect


def test_truncated_shard_is_named_or_skipped(tmp_path):
    urls = _write(tmp_path, sizes=(3, 3))
    with tarfile.open(urls[1]) as tar:
        cut = tar.getmember("k004.png").offset_data + 5
    Path(urls[1]).write_bytes(Path(urls[1]).read_bytes()[:cut])  # k003 whole, k004 cut, k005 gone
    stream = ShardStream(urls, batch_size=3, num_samples=6, key=0, pair_transform=_caption, shuffle_in_shard=False)
    with pytest.raises(BadSampleError, match=r"shard-000001\.tar: truncated or corrupt shard: reading its first 1 samples only"):
        [stream.batch(s) for s in range(2)]
    skipping = ShardStream(urls, batch_size=3, num_samples=6, key=0, pair_transform=_caption, shuffle_in_shard=False,
                           skip_bad=True)
    got = [c for s in range(2) for c in skipping.batch(s)]
    assert {f"caption k00{i}" for i in range(4)} <= set(got) and len(got) == 6
    assert skipping.num_skipped == 1  # the shard, once


def test_state_pickles_without_open_files(shards):
    import pickle

    stream = ShardStream(shards, batch_size=4, num_samples=16, key=0, pair_transform=_caption)
    first = stream.batch(1)
    copy = pickle.loads(pickle.dumps(stream))
    assert copy.batch(1) == first and copy.batch(2) == stream.batch(2)
    assert copy.num_skipped == 0
