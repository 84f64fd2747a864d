"""`sur-cache inspect`'s text: every manifest field but the checksums, one line per array.
(tests/test_cli_store.py runs it on a real store.)"""

from sur_cache.stages.inspect import format_description
from sur_cache.store import FIELD_SHA256


def test_format_description_lists_the_manifest_and_arrays():
    description = {
        "url": "file:///data/s.zarr",
        "num_samples": 3,
        "complete": 2,
        "pending": 0,
        "skipped": {"missing_file": 1},
        "bytes_stored": 3 * 2**20,
        "manifest": {"resolution": 512, "crop": "center", FIELD_SHA256: {"x": "y"}},
        "arrays": {"llm": {"shape": [3, 8], "dtype": "float16", "chunks": [1, 8], "shards": [3, 8], "bytes_stored": 0}},
    }
    assert format_description(description).splitlines() == [
        "store     file:///data/s.zarr",
        "samples   3: 2 complete, 0 pending",
        "skipped   1 (missing_file 1)",
        "on disk   3.00 MiB",
        "manifest",
        "  resolution             512",
        '  crop                   "center"',
        "arrays",
        "  llm                    (3, 8)             float16  chunks (1, 8) shards (3, 8) 0.00 MiB",
    ]
