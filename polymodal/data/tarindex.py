"""A fast index of an uncompressed tar file: name, data offset and size of every regular file.

Only the 512-byte headers are read (and the PAX / GNU long-name records before them); the data
is skipped by seeking. That is about 5x faster than listing ``tarfile`` members (14 ms against
68 ms for a WebDataset shard of 512 members, each behind a PAX header), which matters because
:class:`polymodal.data.ShardStream` indexes every shard in every reading process.

A file that is cut short or corrupt yields the members before the damage, and says why it stopped.

>>> import io, tarfile, tempfile
>>> path = tempfile.mkstemp(suffix=".tar")[1]
>>> with tarfile.open(path, "w") as t:
...     for name, data in (("a.txt", b"hello"), ("b.png", b"xy")):
...         info = tarfile.TarInfo(name); info.size = len(data); t.addfile(info, io.BytesIO(data))
>>> index = index_tar(path)
>>> [(m.name, m.size) for m in index.members], index.problem
([('a.txt', 5), ('b.png', 2)], None)
>>> read_member(path, index.members[0])
b'hello'
"""

from __future__ import annotations

import os
from typing import NamedTuple

__all__ = ["Member", "TarIndex", "index_tar", "read_member"]

_BLOCK = 512
_FILE_TYPES = (b"0", b"\0", b"7")  # regular and contiguous files


class Member(NamedTuple):
    name: str  # path inside the archive
    offset: int  # byte offset of the data
    size: int  # bytes of data


class TarIndex(NamedTuple):
    members: list[Member]  # regular files, in stored order, whole
    problem: str | None  # why the scan stopped early (truncated / corrupt file), else None
    cut: str | None  # the member the damage is in, when known


def _number(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(field[1:], "big")
    digits = field.replace(b"\0", b" ").strip()
    return int(digits, 8) if digits else 0


def _pax(data: bytes) -> dict[bytes, bytes]:
    out, i = {}, 0
    while i < len(data) and data[i:i + 1] != b"\0":
        length = int(data[i:data.index(b" ", i)])
        key, _, value = data[data.index(b" ", i) + 1:i + length - 1].partition(b"=")
        out[key] = value
        i += length
    return out


def index_tar(path: str | os.PathLike) -> TarIndex:
    """The regular files of an uncompressed tar file (ustar, GNU or PAX); ``ValueError`` if compressed."""
    members: list[Member] = []
    total = os.path.getsize(path)
    with open(path, "rb") as f:
        if f.read(2) in (b"\x1f\x8b", b"BZ", b"\xfd7", b"(\xb5"):
            raise ValueError(f"{path}: expected an uncompressed tar file (read by seeking), got a compressed one")
        offset, long_name, pax = 0, None, {}
        while True:
            if offset > total:  # cut inside the padding after a member's data: what followed is lost
                return TarIndex(members, f"the file ends at byte {total}, inside padding before byte {offset}", None)
            f.seek(offset)
            h = f.read(_BLOCK)
            if not h.strip(b"\0"):  # the end: zero blocks, some of them, or none (as tarfile allows)
                return TarIndex(members, None, None)
            if len(h) < _BLOCK:
                return TarIndex(members, f"the file ends inside a header at byte {offset}", None)
            try:
                checksum = _number(h[148:156])
                size = _number(h[124:136])
            except ValueError:
                checksum = size = -1
            if checksum != sum(h[:148]) + 256 + sum(h[156:]):
                return TarIndex(members, f"bad header at byte {offset} (not a tar file, or corrupt)", None)
            kind, data = h[156:157], offset + _BLOCK
            name = h[:100].split(b"\0", 1)[0]
            if h[257:262] == b"ustar" and h[345:346] != b"\0":
                name = h[345:500].split(b"\0", 1)[0] + b"/" + name
            if kind in (b"x", b"L"):  # a record for the next header: PAX attributes or a GNU long name
                record = f.read(size)
                if len(record) < size:
                    return TarIndex(members, f"the file ends inside a header record at byte {data}", None)
                if kind == b"x":
                    pax = _pax(record)
                else:
                    long_name = record.split(b"\0", 1)[0]
            elif kind != b"g":  # a global PAX header changes nothing we read
                name = pax.get(b"path", long_name or name)
                size = int(pax[b"size"]) if b"size" in pax else size
                text = name.decode("utf-8", "surrogateescape")
                if data + size > total:
                    return TarIndex(members, f"the file ends at byte {total}, inside {text!r}", text)
                if kind in _FILE_TYPES and not text.endswith("/"):  # old tars mark folders by the slash only
                    members.append(Member(text, data, size))
                long_name, pax = None, {}
            offset = data + -(-size // _BLOCK) * _BLOCK


def read_member(path_or_file, member: Member) -> bytes:
    """The data of one member: an open binary file (or a path) is read at the member's offset."""
    if isinstance(path_or_file, (str, os.PathLike)):
        with open(path_or_file, "rb") as f:
            return read_member(f, member)
    path_or_file.seek(member.offset)
    return path_or_file.read(member.size)
