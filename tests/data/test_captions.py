"""ImageTextFolder (JSONL / CSV) and webdataset_pipeline on fixtures written to tmp_path."""

import json
import logging

import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms.functional import to_tensor

from polymodal.data.captions import BadSampleError, ImageTextFolder, load_image, webdataset_pipeline

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "white": (255, 255, 255)}


def _mean_rgb(x):
    return [round(v) for v in (x.mean((1, 2)) * 255).tolist()]


@pytest.fixture
def folder(tmp_path):
    """Four good 8x8 images (png / jpg), one that is not an image, one truncated png."""
    img = tmp_path / "img"
    img.mkdir()
    for name, rgb in COLOURS.items():
        Image.new("RGB", (8, 8), rgb).save(img / f"{name}.{'jpg' if name == 'green' else 'png'}")
    (img / "broken.jpg").write_bytes(b"this is not a jpeg")
    good = (img / "red.png").read_bytes()
    big = tmp_path / "big.png"
    Image.effect_noise((64, 64), 50).convert("RGB").save(big)
    (img / "truncated.png").write_bytes(big.read_bytes()[:200])
    assert len(good) > 0
    return tmp_path


def _jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def _good_lines():
    return [
        json.dumps({"image": "img/red.png", "caption": "a red square"}),
        json.dumps({"image": "img/green.jpg", "caption": " a green square "}),
        "",  # blank lines are ignored
        json.dumps({"image": "img/blue.png", "caption": ["a blue square", "blue"]}),
    ]


# --- ImageTextFolder: JSONL ------------------------------------------------------------------


def test_jsonl_items_and_transform(folder):
    _jsonl(folder / "ann.jsonl", _good_lines())
    ds = ImageTextFolder(folder, "ann.jsonl", transform=to_tensor)
    assert len(ds) == 4 and ds.num_skipped == 0  # the list caption gives two samples
    image, caption = ds[0]
    assert image.shape == (3, 8, 8) and _mean_rgb(image) == [255, 0, 0] and caption == "a red square"
    assert ds[1][1] == "a green square"  # stripped
    assert [ds[i][1] for i in (2, 3)] == ["a blue square", "blue"]
    assert ds[-1][1] == "blue"
    raw, _ = ImageTextFolder(folder, folder / "ann.jsonl")[2]  # absolute annotation path, no transform
    assert isinstance(raw, Image.Image) and raw.mode == "RGB" and raw.getpixel((0, 0)) == (0, 0, 255)
    with pytest.raises(IndexError, match="index 4 out of range for 4 samples"):
        ds[4]


def test_pair_transform_gets_image_and_caption(folder):
    _jsonl(folder / "ann.jsonl", _good_lines())
    ds = ImageTextFolder(folder, "ann.jsonl", pair_transform=lambda im, cap: (im.size, cap.upper()))
    assert ds[0] == ((8, 8), "A RED SQUARE")
    with pytest.raises(ValueError, match="expected transform .* or pair_transform .*, got both"):
        ImageTextFolder(folder, "ann.jsonl", transform=to_tensor, pair_transform=lambda a, b: a)
    with pytest.raises(TypeError, match="transform: expected a callable or None, got str"):
        ImageTextFolder(folder, "ann.jsonl", transform="resize")


def test_missing_file_and_malformed_lines_raise_one_error(folder):
    lines = _good_lines() + [
        json.dumps({"image": "img/nope.png", "caption": "gone"}),  # line 5
        '{"image": "img/red.png", "caption": ',  # line 6
        json.dumps({"image": "img/red.png"}),  # line 7
        json.dumps(["img/red.png", "a list"]),  # line 8
        json.dumps({"image": "", "caption": "empty path"}),  # line 9
    ]
    _jsonl(folder / "ann.jsonl", lines)
    with pytest.raises(BadSampleError) as err:
        ImageTextFolder(folder, "ann.jsonl")
    msg = str(err.value)
    assert "ann.jsonl: 5 bad sample(s)" in msg and "skip_bad=True" in msg
    assert "line 5: missing image file" in msg and "nope.png" in msg
    assert "line 6: malformed JSON" in msg
    assert "line 7: missing 'caption' (got keys ['image'])" in msg
    assert "line 8: expected a JSON object, got list" in msg
    assert "line 9: expected 'image' to be a non-empty path, got ''" in msg


def test_skip_bad_skips_and_counts_with_summary(folder, caplog):
    lines = _good_lines() + [json.dumps({"image": "img/nope.png", "caption": "gone"}), "not json"]
    _jsonl(folder / "ann.jsonl", lines)
    with caplog.at_level(logging.WARNING, logger="polymodal.data.captions"):
        ds = ImageTextFolder(folder, "ann.jsonl", transform=to_tensor, skip_bad=True)
    assert len(ds) == 4 and ds.num_skipped == 2
    assert "skipped 2 of 6 samples" in ds.summary() and "line 5: missing image file" in ds.summary()
    assert "line 6: malformed JSON" in caplog.text
    assert "skipped=2" in repr(ds)


def test_unreadable_image_raises_naming_file_and_line(folder):
    lines = _good_lines() + [json.dumps({"image": "img/broken.jpg", "caption": "broken"}), json.dumps({"image": "img/truncated.png", "caption": "cut"})]
    _jsonl(folder / "ann.jsonl", lines)
    ds = ImageTextFolder(folder, "ann.jsonl", transform=to_tensor)
    assert len(ds) == 6  # files exist: found bad only when decoded
    with pytest.raises(BadSampleError, match=r"broken\.jpg \(line 5 of .*ann\.jsonl\): cannot read image: UnidentifiedImageError"):
        ds[4]
    with pytest.raises(BadSampleError, match=r"truncated\.png \(line 6 of .*\): cannot read image"):
        ds[5]


def test_unreadable_images_skipped_and_counted_across_workers(folder):
    lines = [
        json.dumps({"image": "img/red.png", "caption": "r"}),
        json.dumps({"image": "img/broken.jpg", "caption": "x"}),
        json.dumps({"image": "img/green.jpg", "caption": "g"}),
        json.dumps({"image": "img/truncated.png", "caption": "y"}),
        json.dumps({"image": "img/blue.png", "caption": "b"}),
        json.dumps({"image": "img/white.png", "caption": "w"}),
    ]
    _jsonl(folder / "ann.jsonl", lines)
    ds = ImageTextFolder(folder, "ann.jsonl", transform=to_tensor, skip_bad=True)
    assert ds.num_skipped == 0
    batches = list(DataLoader(ds, batch_size=2, num_workers=2))
    captions = [c for _, caps in batches for c in caps]
    assert captions == ["r", "g", "g", "b", "b", "w"]  # a bad sample is replaced by the next good one
    assert all(images.shape == (2, 3, 8, 8) for images, _ in batches)
    assert ds.num_skipped == 2  # flagged in the workers, seen by the parent
    assert "line 2: cannot load image" in ds.summary() and "truncated.png" in ds.summary()
    list(DataLoader(ds, batch_size=3, num_workers=2))
    assert ds.num_skipped == 2  # counted once per sample, not once per epoch


# --- ImageTextFolder: CSV / TSV ---------------------------------------------------------------


def test_csv_with_custom_columns_and_bad_rows(folder):
    (folder / "ann.csv").write_text('id,img,text\n1,img/red.png,"a red, square"\n2,img/blue.png\n3,img/nope.png,gone\n4,img/white.png,"white\nsquare"\n')
    with pytest.raises(BadSampleError) as err:
        ImageTextFolder(folder, "ann.csv", image_key="img", caption_key="text")
    assert "line 3: expected 3 fields, got 2" in str(err.value)
    assert "line 4: missing image file" in str(err.value)
    ds = ImageTextFolder(folder, "ann.csv", to_tensor, image_key="img", caption_key="text", skip_bad=True)
    assert [c for _, c in (ds[0], ds[1])] == ["a red, square", "white\nsquare"] and ds.num_skipped == 2
    assert _mean_rgb(ds[1][0]) == [255, 255, 255]


def test_csv_header_and_format_errors(folder):
    (folder / "ann.csv").write_text("path,text\nimg/red.png,red\n")
    with pytest.raises(ValueError, match=r"header: expected columns 'image' and 'caption', got \['path', 'text'\]"):
        ImageTextFolder(folder, "ann.csv")
    (folder / "ann.txt").write_text("")
    with pytest.raises(ValueError, match="format: expected 'jsonl' or 'csv'.*got 'ann.txt'"):
        ImageTextFolder(folder, "ann.txt")
    with pytest.raises(FileNotFoundError, match="annotations: no such file: .*missing.jsonl"):
        ImageTextFolder(folder, "missing.jsonl")


def test_tsv_and_explicit_format(folder):
    (folder / "ann.tsv").write_text("image\tcaption\nimg/green.jpg\ta green, square\n")
    ds = ImageTextFolder(folder, "ann.tsv", to_tensor)
    assert ds[0][1] == "a green, square" and _mean_rgb(ds[0][0])[1] > 240
    (folder / "ann.txt").write_text("image;caption\nimg/red.png;red\n")
    assert ImageTextFolder(folder, "ann.txt", format="csv", delimiter=";")[0][1] == "red"


def test_load_image_errors(folder):
    assert load_image(folder / "img" / "red.png").getpixel((3, 3)) == (255, 0, 0)
    assert load_image((folder / "img" / "blue.png").read_bytes()).getpixel((0, 0)) == (0, 0, 255)
    with pytest.raises(BadSampleError, match="nope.png: missing image file"):
        load_image(folder / "img" / "nope.png")
    with pytest.raises(BadSampleError, match="<bytes>: cannot read image"):
        load_image(b"garbage")


# --- webdataset ------------------------------------------------------------------------------


@pytest.fixture
def shards(tmp_path, folder):
    """Two shards: 0 = red, green, broken image, blue; 1 = white, no caption, red (png)."""
    broken = (folder / "img" / "broken.jpg").read_bytes()
    samples = [
        [("s0a", {"png": Image.new("RGB", (8, 8), COLOURS["red"]), "txt": "red"}),
         ("s0b", {"jpg": Image.new("RGB", (8, 8), COLOURS["green"]), "txt": "green"}),
         ("s0c", {"jpg": broken, "txt": "broken"}),
         ("s0d", {"png": Image.new("RGB", (8, 8), COLOURS["blue"]), "txt": "blue"})],
        [("s1a", {"png": Image.new("RGB", (8, 8), COLOURS["white"]), "txt": "white"}),
         ("s1b", {"png": Image.new("RGB", (8, 8), COLOURS["red"])}),
         ("s1c", {"png": Image.new("RGB", (8, 8), COLOURS["red"]), "txt": "red again"})],
    ]
    urls = []
    for i, shard in enumerate(samples):
        url = str(tmp_path / f"shard-{i}.tar")
        with wds.TarWriter(url) as sink:
            for key, fields in shard:
                sink.write({"__key__": key, **fields})
        urls.append(url)
    return urls


def test_webdataset_skips_and_counts_with_workers(shards):
    pipe = webdataset_pipeline(shards, transform=to_tensor, skip_bad=True)
    loader = DataLoader(pipe, batch_size=2, num_workers=2)
    pairs = [(img, cap) for images, caps in loader for img, cap in zip(images, caps)]
    assert sorted(c for _, c in pairs) == ["blue", "green", "red", "red again", "white"]
    by_caption = {c: _mean_rgb(img) for img, c in pairs}
    assert by_caption["red"] == [255, 0, 0] and by_caption["white"] == [255, 255, 255]
    assert by_caption["green"][1] > 240 and by_caption["green"][0] < 15  # jpeg
    assert pipe.num_skipped == 2


def test_webdataset_raises_naming_shard_and_key(shards):
    with pytest.raises(BadSampleError, match=r"shard-0\.tar: sample 's0c': jpg: cannot read image"):
        list(webdataset_pipeline(shards[:1], transform=to_tensor))
    with pytest.raises(BadSampleError, match=r"shard-1\.tar: sample 's1b': no caption: expected 'txt', got \['png'\]"):
        list(webdataset_pipeline(shards[1:], transform=to_tensor))
    with pytest.raises(Exception, match=r"shard-1\.tar: sample 's1b': no caption"):  # re-raised from a worker
        list(DataLoader(webdataset_pipeline(shards[1:], transform=to_tensor), batch_size=None, num_workers=2))


def test_webdataset_missing_shard(shards, tmp_path):
    urls = [*shards, str(tmp_path / "nope.tar")]
    with pytest.raises(BadSampleError, match=r"nope\.tar: cannot read shard: FileNotFoundError"):
        list(webdataset_pipeline(urls[2:]))
    pipe = webdataset_pipeline(urls, pair_transform=lambda im, cap: cap, skip_bad=True)
    assert sorted(pipe) == ["blue", "green", "red", "red again", "white"]
    assert pipe.num_skipped == 3  # two bad samples + one unreadable shard


def test_webdataset_batched_shuffled_and_resampled(shards):
    pipe = webdataset_pipeline(shards, transform=to_tensor, batch_size=2, shuffle=10, seed=0, skip_bad=True)
    batches = list(DataLoader(pipe, batch_size=None, num_workers=0))
    assert [b[0].shape for b in batches] == [(2, 3, 8, 8), (2, 3, 8, 8), (1, 3, 8, 8)]
    assert sorted(c for b in batches for c in b[1]) == ["blue", "green", "red", "red again", "white"]
    again = list(webdataset_pipeline(shards, pair_transform=lambda im, c: c, shuffle=10, seed=0, skip_bad=True))
    assert again == list(webdataset_pipeline(shards, pair_transform=lambda im, c: c, shuffle=10, seed=0, skip_bad=True))
    stream = iter(webdataset_pipeline(shards, pair_transform=lambda im, c: c, resampled=True, seed=1, skip_bad=True))
    assert {next(stream) for _ in range(40)} <= {"blue", "green", "red", "red again", "white"}
    with pytest.raises(ValueError, match="urls: expected at least one shard, got none"):
        webdataset_pipeline([])


def test_check_files_false_finds_missing_files_when_loading(folder):
    lines = [json.dumps({"image": "img/nope.png", "caption": "gone"}), json.dumps({"image": "img/red.png", "caption": "r"})]
    _jsonl(folder / "ann.jsonl", lines)
    ds = ImageTextFolder(folder, "ann.jsonl", check_files=False)
    assert len(ds) == 2
    with pytest.raises(BadSampleError, match=r"nope\.png \(line 1 of .*\): missing image file"):
        ds[0]
    ds = ImageTextFolder(folder, "ann.jsonl", to_tensor, check_files=False, skip_bad=True)
    assert ds[0][1] == "r" and ds.num_skipped == 1 and "line 1: cannot load image" in ds.summary()
