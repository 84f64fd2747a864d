"""Direct reads of the store's uncompressed local shard files into a caller's buffer.

zarr-python reads a shard through its event-loop thread, one task, decoded buffer and copy per chunk; that was most
of the loader's time (docs/store.md). For the layout the store writes by default (Zarr v3 `sharding_indexed`, each
chunk `bytes` little-endian then `crc32c`, the shard index `bytes` then `crc32c` at the end of the file) the bytes of
a chunk on disk are the array's rows followed by their checksum, so a read is one `preadv` per chunk straight into
the destination rows, then the crc32c of those rows. Anything else (compression, another codec chain, a chunk the
index lists as absent) is not handled here and goes through zarr.

The format (Zarr v3 sharding codec): the index is `chunks x (offset, nbytes)` uint64 little-endian plus its own
crc32c; an absent chunk has offset and nbytes 2**64 - 1. Edge chunks are stored at the full chunk shape.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import sys
from dataclasses import dataclass
from typing import Any

import google_crc32c
import numpy as np

_ABSENT = np.uint64(2**64 - 1)
_CHECKSUM_BYTES = 4
_PLAIN_CODECS = [{"name": "bytes"}, {"name": "crc32c"}]


def identity_token(identity: tuple[int, int, int, int]) -> int:
    """A nonzero 63-bit number standing for one version of one file (device, inode, size, modification time in ns),
    the same in every process (Python's `hash` is salted per process)."""
    raw = b"".join(int(part).to_bytes(16, "little", signed=True) for part in identity)
    return (int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little") >> 1) or 1


class ShardDamage(ValueError):
    """A shard file that cannot be decoded: a checksum mismatch, a truncated file or an index out of range."""


@dataclass(frozen=True)
class ShardLayout:
    """What a direct read needs of one array: rows per chunk and per shard, and the bytes of one row."""

    chunk_rows: int
    shard_rows: int
    row_bytes: int

    @property
    def chunks_per_shard(self) -> int:
        return -(-self.shard_rows // self.chunk_rows)


def plain_layout(metadata: dict[str, Any]) -> ShardLayout | None:
    """The layout of an array whose metadata (its `zarr.json` as a dict, lists or tuples) is sharded with plain
    checksummed chunks, else None."""
    codecs = metadata.get("codecs") or []
    if sys.byteorder != "little" or len(codecs) != 1 or codecs[0].get("name") != "sharding_indexed":
        return None
    config = codecs[0].get("configuration", {})
    if config.get("index_location", "end") != "end":
        return None
    if any(_names(config.get(key)) != _PLAIN_CODECS for key in ("codecs", "index_codecs")):
        return None
    if any(c.get("configuration", {}).get("endian", "little") != "little" for c in config["codecs"]):
        return None
    chunk, shard = config["chunk_shape"], metadata["chunk_grid"]["configuration"]["chunk_shape"]
    if list(chunk[1:]) != list(metadata["shape"][1:]) or list(shard[1:]) != list(chunk[1:]):
        return None  # chunked along the sample axis only, as the store writes every array
    row_bytes = np.dtype(str(metadata["data_type"])).itemsize * int(np.prod(chunk[1:], dtype=np.int64))
    return ShardLayout(chunk_rows=int(chunk[0]), shard_rows=int(shard[0]), row_bytes=row_bytes)


def _names(codecs: Any) -> list[dict[str, str]] | None:
    return [{"name": c.get("name")} for c in codecs] if isinstance(codecs, (list, tuple)) else None


def read_rows(path: str, layout: ShardLayout, first: int, stop: int, out: np.ndarray) -> bool:
    """Rows `[first, stop)` of the shard file at `path` (rows counted inside the shard) into `out`, checksums checked.

    `out` is C-contiguous with `stop - first` rows of `layout.row_bytes`. Returns False, having written nothing
    certain, when a needed chunk is absent from the index (the caller reads through zarr, which knows fill values).
    Raises FileNotFoundError when there is no file and ShardDamage when it cannot be decoded.
    """
    if not out.flags.c_contiguous:
        raise ValueError("out must be C-contiguous: rows are read into it in place")
    target = out.reshape(-1).view(np.uint8)
    if target.size != (stop - first) * layout.row_bytes:
        raise ValueError(
            f"out holds {target.size} bytes, rows {first}..{stop} need {(stop - first) * layout.row_bytes}"
        )
    fd = os.open(path, os.O_RDONLY)
    try:
        index = _index(fd, layout, path)
        chunk_bytes = layout.chunk_rows * layout.row_bytes
        for chunk in range(first // layout.chunk_rows, (stop - 1) // layout.chunk_rows + 1):
            offset, nbytes = index[chunk]
            if offset == _ABSENT and nbytes == _ABSENT:
                return False
            if nbytes != chunk_bytes + _CHECKSUM_BYTES:
                raise ShardDamage(f"{path}: chunk {chunk} holds {nbytes} bytes, expected {chunk_bytes + 4}")
            a, b = chunk * layout.chunk_rows, (chunk + 1) * layout.chunk_rows
            lo, hi = max(a, first), min(b, stop)
            rows = target[(lo - first) * layout.row_bytes : (hi - first) * layout.row_bytes]
            if (lo, hi) == (a, b):
                _read_chunk(fd, int(offset), rows, path, chunk)
            else:  # the range starts or ends inside this chunk: decode it whole, keep the part asked for
                whole = np.empty(chunk_bytes, np.uint8)
                _read_chunk(fd, int(offset), whole, path, chunk)
                rows[:] = whole[(lo - a) * layout.row_bytes : (hi - a) * layout.row_bytes]
    finally:
        os.close(fd)
    return True


def _index(fd: int, layout: ShardLayout, path: str) -> np.ndarray:
    """The shard index, `[chunks, 2]` uint64 `(offset, nbytes)`, its checksum checked."""
    size = layout.chunks_per_shard * 16 + _CHECKSUM_BYTES
    end = os.fstat(fd).st_size
    raw = os.pread(fd, size, end - size) if end >= size else b""
    if len(raw) != size or google_crc32c.value(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
        raise ShardDamage(f"{path}: the shard index fails its checksum (or the file is truncated)")
    index = np.frombuffer(raw[:-4], dtype="<u8").reshape(-1, 2)
    present = index[:, 0] != _ABSENT
    if (index[present, 0] + index[present, 1] > end - size).any():
        raise ShardDamage(f"{path}: the shard index points past the chunk data (a truncated file)")
    return index


def _read_chunk(fd: int, offset: int, rows: np.ndarray, path: str, chunk: int) -> None:
    """One chunk's bytes straight into `rows` (a uint8 view of the destination), then its checksum checked."""
    checksum = bytearray(_CHECKSUM_BYTES)
    if os.preadv(fd, [rows, checksum], offset) != rows.size + _CHECKSUM_BYTES:
        raise ShardDamage(f"{path}: chunk {chunk} is truncated")
    if google_crc32c.value(rows) != int.from_bytes(checksum, "little"):
        raise ShardDamage(f"{path}: chunk {chunk}: stored and computed checksum do not match")


class MappedShard:
    """One shard file mapped read-only, its chunks' rows served as views of the map: no read, no copy.

    A chunk's crc32c is checked the first time its rows are asked for, then never again for this file: `verified`
    holds the chunks checked so far, and a later map of the same file (same `identity`: device, inode, size and
    modification time) may be handed the earlier map's set. `tokens`, when set, are the slots where another process
    records the chunks it checked (`check_ahead`): a chunk whose slot holds this file's `token` is taken as checked.
    The mapped pages are the page cache itself (they count as cache, not as this process's memory). Raises
    FileNotFoundError when there is no file; `rows` raises ShardDamage for a chunk that fails its checksum, has the
    wrong size or is absent from the index (an absent chunk holds no rows, and is never served as zeros).
    """

    def __init__(self, path: str, layout: ShardLayout) -> None:
        self.path, self.layout = path, layout
        with open(path, "rb") as file:
            stat = os.fstat(file.fileno())
            self.identity = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
            self.token = identity_token(self.identity)
            self._index = _index(file.fileno(), layout, path)
            # the map outlives the descriptor; MAP_POPULATE maps every page now, in one call, rather than a page
            # fault at a time (the buffered order reads all of a shard's rows within a few batches)
            self._map = mmap.mmap(file.fileno(), 0, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE, prot=mmap.PROT_READ)
        self._bytes = np.frombuffer(self._map, np.uint8)
        self._chunks = self._index.tolist()  # `(offset, nbytes)` as Python ints: `rows` runs once per chunk and map
        self.verified: set[int] = set()
        self.tokens: np.ndarray | None = None

    def check(self, chunk: int) -> None:
        """Check chunk `chunk`'s crc32c now if it is not checked yet (raises ShardDamage)."""
        self.rows(chunk)

    def rows(self, chunk: int) -> np.ndarray:
        """Chunk `chunk`'s rows as a `[chunk_rows, row_bytes]` uint8 view of the map, its crc32c checked first."""
        offset, nbytes = self._chunks[chunk]
        chunk_bytes = self.layout.chunk_rows * self.layout.row_bytes
        if offset == nbytes == _ABSENT:
            raise ShardDamage(f"{self.path}: chunk {chunk} is absent from the shard index")
        if nbytes != chunk_bytes + _CHECKSUM_BYTES:
            raise ShardDamage(f"{self.path}: chunk {chunk} holds {nbytes} bytes, expected {chunk_bytes + 4}")
        rows = self._bytes[offset : offset + chunk_bytes]
        if chunk not in self.verified and not (self.tokens is not None and self.tokens[chunk] == self.token):
            stored = int.from_bytes(self._bytes[offset + chunk_bytes : offset + nbytes].tobytes(), "little")
            if google_crc32c.value(rows) != stored:
                raise ShardDamage(f"{self.path}: chunk {chunk}: stored and computed checksum do not match")
            if self.tokens is not None:
                self.tokens[chunk] = self.token  # the checking process need not check it again
        self.verified.add(chunk)
        return rows.reshape(self.layout.chunk_rows, self.layout.row_bytes)

    def close(self) -> None:
        """Unmap the file now, or, while a view of it is still alive somewhere (a caller's, a traceback's), as soon as
        the last one goes: the views keep the map alive, never a dangling pointer."""
        self._bytes = None
        try:
            self._map.close()
        except BufferError:
            pass  # a view still exports the map; dropping our references leaves the unmapping to it
