"""Reading a `.pt` file a user was handed (a reference checkpoint, a prompt2vec feature file) without trusting it.

Two dangers, two rules. Unpickling can run code, so such files are read only with `torch.load(weights_only=True)`
(by the callers). And a zip archive, torch.save's format, can declare entries far larger than itself: a 1 MB deflated
file unpacks to gigabytes of memory before any key is checked. torch.save stores its entries uncompressed, so a
genuine file declares about its own size; `refuse_inflating_archive` reads the archive's central directory (the
declared sizes, which bound what torch allocates) and refuses more than MAX_INFLATION times the file's size, before
anything is unpacked. The legacy (non-zip) format holds no compressed data; torch checks its declared sizes itself.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

MAX_INFLATION = 4.0


def refuse_inflating_archive(path: Path, what: str) -> None:
    """Raise ValueError if `path` is a zip archive declaring more than MAX_INFLATION x its size; `what` names it."""
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            declared = sum(entry.file_size for entry in archive.infolist())
    except zipfile.BadZipFile as error:
        raise ValueError(f"{what} {path}: not a readable torch.save zip archive ({error})") from error
    size = max(Path(path).stat().st_size, 1)
    if declared > MAX_INFLATION * size:
        raise ValueError(
            f"{what} {path}: its zip archive declares {declared:,} bytes of entries in a {size:,}-byte file "
            f"({declared / size:,.0f}x, at most {MAX_INFLATION:g}x accepted); torch.save stores its entries "
            "uncompressed, so this file was recompressed or built to exhaust memory, and it is refused before anything "
            "is unpacked. If you trust it, re-save it uncompressed with torch.save."
        )
