"""Direct reads of uncompressed local shard files: the same rows as zarr's read path, checksums and truncation
caught, and any other layout left to zarr."""

from __future__ import annotations

import google_crc32c
import numpy as np
import pytest

from sur_cache.shard_files import MappedShard, ShardDamage, plain_layout, read_rows
from sur_cache.store import DONE, FeatureStore, StoreFormatError, synthetic_store

SHAPES = dict(clip_width=5, llm_width=7, latent_channels=2, latent_size=3, tokenizer_max_length=4)


def _written_store(tmp_path, **layout) -> FeatureStore:
    store = synthetic_store(tmp_path / "s.zarr", **{**SHAPES, **layout})
    rng = np.random.default_rng(0)
    for shard, (start, stop) in enumerate(store.shard_ranges()):
        rows = {
            name: (rng.standard_normal((stop - start, *spec.row_shape)) * 100).astype(spec.dtype)
            for name, spec in store.specs.items()
            if name != "status"
        }
        store.write_shard(shard, rows, np.full(stop - start, DONE, np.uint8))
    return FeatureStore.open(store.url)


@pytest.mark.parametrize("chunk_rows", [1, 3])
def test_direct_reads_equal_zarr_for_any_range(tmp_path, chunk_rows):
    store = _written_store(tmp_path, num_samples=23, shard_rows=8, chunk_rows=chunk_rows)  # a partial last chunk
    assert all(store.direct_layout(name) is not None for name in store.array_names)
    rng = np.random.default_rng(1)
    ranges = [(0, 23), (0, 8), (22, 23)] + [tuple(sorted(rng.choice(24, 2, replace=False))) for _ in range(20)]
    for start, stop in ranges:
        out = {
            name: np.full((stop - start, *store.array(name).shape[1:]), 7, store.array(name).dtype)
            for name in store.array_names
        }
        read = store.read(store.array_names, start, stop, out=out)
        for name in store.array_names:
            assert read[name] is out[name]  # decoded into the caller's buffer
            np.testing.assert_array_equal(read[name], store.array(name)[start:stop], err_msg=f"{name} {start}:{stop}")


def test_a_compressed_layout_is_left_to_zarr(tmp_path):
    store = _written_store(tmp_path, num_samples=6, shard_rows=4, chunk_rows=2, compression="zstd")
    assert plain_layout(store.array("clip_simple").metadata.to_dict()) is None
    np.testing.assert_array_equal(store.read(["llm"], 1, 6)["llm"], store.array("llm")[1:6])


def test_a_damaged_index_or_truncated_file_is_named(tmp_path):
    store = _written_store(tmp_path, num_samples=8, shard_rows=4, chunk_rows=2)
    path = store._shard_path("clip_complex", 1)
    layout = store.direct_layout("clip_complex")
    data = bytearray(open(path, "rb").read())
    out = np.empty((4, 4, 5), np.float16)
    open(path, "wb").write(bytes(data[:-1]) + bytes([data[-1] ^ 1]))  # the index's checksum
    with pytest.raises(ShardDamage, match="shard index fails its checksum"):
        read_rows(path, layout, 0, 4, out)
    with pytest.raises(StoreFormatError, match=r"array 'clip_complex', samples 4..7: cannot be decoded"):
        store.read(["clip_complex"], 4, 8)
    open(path, "wb").write(bytes(data[40:]))  # the index intact, the chunk data shortened
    with pytest.raises(ShardDamage, match="past the chunk data"):
        read_rows(path, layout, 0, 4, out)


def test_a_mapped_shard_serves_zarrs_rows_and_checks_each_chunk_when_first_needed(tmp_path):
    store = _written_store(tmp_path, num_samples=8, shard_rows=4, chunk_rows=2, clip_width=16)  # rows of 128 bytes
    path, layout = store._shard_path("clip_complex", 1), store.direct_layout("clip_complex")
    assert layout.chunks_per_shard == 2
    mapped = MappedShard(path, layout)
    rows = np.concatenate([mapped.rows(c).view(np.float16).reshape(2, 4, 16) for c in range(2)])
    np.testing.assert_array_equal(rows, store.array("clip_complex")[4:8])
    mapped.close()
    data = bytearray(open(path, "rb").read())
    data[layout.chunk_rows * layout.row_bytes + 4 + 3] ^= 0xFF  # chunk 1 (rows 2, 3)
    open(path, "wb").write(bytes(data))
    mapped = MappedShard(path, layout)
    mapped.rows(0)  # chunk 0 (rows 0, 1) is intact and served
    with pytest.raises(ShardDamage, match="chunk 1: stored and computed checksum do not match"):
        mapped.rows(1)
    mapped.close()


def test_a_chunk_absent_from_the_index_is_damage_never_zeros(tmp_path):
    store = _written_store(tmp_path, num_samples=4, shard_rows=4, chunk_rows=2, clip_width=16)
    path, layout = store._shard_path("clip_complex", 0), store.direct_layout("clip_complex")
    data = bytearray(open(path, "rb").read())
    index = np.frombuffer(bytes(data[-36:-4]), "<u8").copy().reshape(2, 2)
    index[1] = 2**64 - 1
    raw = index.tobytes()
    open(path, "wb").write(bytes(data[:-36]) + raw + google_crc32c.value(raw).to_bytes(4, "little"))
    mapped = MappedShard(path, layout)
    with pytest.raises(ShardDamage, match="chunk 1 is absent from the shard index"):
        mapped.rows(1)
    mapped.close()
