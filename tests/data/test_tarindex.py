"""index_tar: the regular files of a tar, by headers only; the reference is Python's tarfile."""

import io
import tarfile
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from polymodal.data.tarindex import index_tar, read_member

FORMATS = {"ustar": tarfile.USTAR_FORMAT, "gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT}


def _tar(path: Path, files, fmt: str) -> None:
    with tarfile.open(path, "w", format=FORMATS[fmt]) as t:
        folder = tarfile.TarInfo("dir")
        folder.type = tarfile.DIRTYPE
        t.addfile(folder)
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("a-link")
        link.type, link.linkname = tarfile.SYMTYPE, files[0][0]
        t.addfile(link)


def _reference(path: Path):
    with tarfile.open(path) as t:
        return [(m.name, t.extractfile(m).read()) for m in t if m.isfile()]


names = st.text(st.sampled_from("abcxyz0123._-é"), min_size=1, max_size=12)
long_names = st.builds(lambda parts: "/".join(parts) + ".txt", st.lists(st.text("abc", min_size=20, max_size=40),
                                                                        min_size=1, max_size=5))


@settings(max_examples=20, deadline=None)
@given(fmt=st.sampled_from(sorted(FORMATS)), data=st.lists(st.binary(max_size=1500), min_size=1, max_size=5),
       name=st.one_of(names, long_names))
def test_members_equal_tarfiles(fmt, data, name):
    files = [(f"{i}-{name}", d) for i, d in enumerate(data)]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.tar"
        try:
            _tar(path, files, fmt)
        except ValueError:  # ustar cannot hold this name (too long / not ASCII)
            return
        index = index_tar(path)
        assert index.problem is None
        assert [(m.name, read_member(path, m)) for m in index.members] == _reference(path) == files


@settings(max_examples=25, deadline=None)
@given(cut=st.integers(0, 13_000), fmt=st.sampled_from(["gnu", "pax"]))
def test_a_cut_file_gives_the_whole_members_before_the_cut(cut, fmt):
    files = [(f"k{i}.bin", bytes([i]) * (700 * i + 5)) for i in range(6)]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.tar"
        _tar(path, files, fmt)
        with tarfile.open(path) as t:  # the reference layout: where each member's headers start and data ends
            members = t.getmembers()
        path.write_bytes(path.read_bytes()[:cut])
        index = index_tar(path)
        expect = [(m.name, files[int(m.name[1])][1]) for m in members if m.isfile() and m.offset_data + m.size <= cut]
        assert [(m.name, read_member(path, m)) for m in index.members] == expect
        clean = cut in {m.offset for m in members} or cut >= members[-1].offset_data + members[-1].size
        assert (index.problem is None) == clean, index.problem


def test_errors(tmp_path):
    (tmp_path / "junk.tar").write_bytes(b"not a tar file at all" * 40)
    assert index_tar(tmp_path / "junk.tar").problem == "bad header at byte 0 (not a tar file, or corrupt)"
    assert index_tar(tmp_path / "junk.tar").members == []
    with tarfile.open(tmp_path / "x.tar.gz", "w:gz") as t:
        t.addfile(tarfile.TarInfo("a"), io.BytesIO(b""))
    with pytest.raises(ValueError, match=r"x\.tar\.gz: expected an uncompressed tar file .*got a compressed one"):
        index_tar(tmp_path / "x.tar.gz")
    (tmp_path / "empty.tar").write_bytes(b"")
    assert index_tar(tmp_path / "empty.tar") == ([], None, None)
