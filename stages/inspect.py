"""`sur-cache inspect`: a feature store's `FeatureStore.describe()` as text for a person (`--json` prints it as is).

The text shows what the description holds, in its order, with one abbreviation: the per-field checksums of the
manifest (verified on every open) are left out. The file names are an array (`file_name`), not a manifest field.
"""

from __future__ import annotations

import json
from typing import Any

from sur_cache.store import FIELD_SHA256


def format_description(description: dict[str, Any]) -> str:
    """The lines `sur-cache inspect STORE` prints: summary, manifest fields, then one line per array."""
    manifest = dict(description["manifest"])
    manifest.pop(FIELD_SHA256, None)
    skipped = ", ".join(f"{reason} {n}" for reason, n in description["skipped"].items()) or "none"
    lines = [
        f"store     {description['url']}",
        f"samples   {description['num_samples']}: {description['complete']} complete, {description['pending']} pending",
        f"skipped   {sum(description['skipped'].values())} ({skipped})",
        f"on disk   {description['bytes_stored'] / 2**20:.2f} MiB",
        "manifest",
        *(f"  {key:<22} {json.dumps(value)}" for key, value in manifest.items()),
        "arrays",
        *(_array_line(name, array) for name, array in description["arrays"].items()),
    ]
    return "\n".join(lines)


def _array_line(name: str, array: dict[str, Any]) -> str:
    return (
        f"  {name:<22} {str(tuple(array['shape'])):<18} {array['dtype']:<8} chunks {tuple(array['chunks'])} "
        f"shards {tuple(array['shards'])} {array['bytes_stored'] / 2**20:.2f} MiB"
    )
