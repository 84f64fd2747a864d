"""SURD rows: reading `metadata.jsonl`, validating each row, and turning images into normalised pixel tensors.

A SURD dataset is a folder holding images and a `metadata.jsonl` with one JSON object per line,
`{"file_name": ..., "text": <simple prompt>, "prompt": <complex prompt>}` (column names configurable).

Validation is split in two on purpose. `read_metadata` streams the file once and does the checks that need no file
system: JSON, columns, text, and the file name's own form (empty, absolute, `..`, NUL), a few microseconds a row.
Everything that touches the file system is left to `ImageDataset.__getitem__`, inside the DataLoader workers, as
they reach each shard's rows: where the name resolves (symlinks outside the folder), whether the file exists, and
decoding it. A row failing there comes back as a record with an `error` (its reason and detail), never as an
exception, so one bad file does not kill a worker or the run; extract marks the sample skipped.

One row never aborts the run: any exception while checking or preparing a row, foreseen or not, makes that row
a bad row with its reason (the exception's type and message for the unforeseen ones, "unexpected_error").
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps

from sur_cache.choices import CropMode

METADATA_FILE = "metadata.jsonl"

BAD_ROW_REASONS = (
    "malformed_json",
    "missing_column",
    "empty_prompt",
    "unsafe_path",
    "missing_file",
    "unreadable_image",
    "unusable_image",
    "invalid_text",
    "invalid_path",
    "unexpected_error",
)


@dataclass(frozen=True)
class Row:
    """One sample that passed the metadata checks. `line` is its 0-based line in metadata.jsonl: the sample's stable
    identity. `root` is the dataset folder (resolved); whether the file is there is checked when it is read."""

    line: int
    file_name: str
    root: Path
    text: str
    prompt: str

    @property
    def path(self) -> Path:
        return self.root / self.file_name


@dataclass(frozen=True)
class BadRow:
    """A skipped sample; `reason` is one of BAD_ROW_REASONS (extract adds "missing_llm_feature" with a feature
    file, and "non_finite_feature" for a NaN or inf feature), `detail` says what exactly was wrong.

    `file_name` is None when the row has none that can be written as UTF-8 (the detail then shows it escaped)."""

    line: int
    file_name: str | None
    reason: str
    detail: str


def read_metadata(
    data_dir: str | Path,
    *,
    text_column: str = "text",
    prompt_column: str = "prompt",
    image_column: str = "file_name",
) -> tuple[list[Row], list[BadRow]]:
    """Parse `data_dir/metadata.jsonl` into rows and bad rows (with reasons), in one pass; blank lines are ignored.

    No file is looked at here (see `ImageDataset`): a row whose file is missing, resolves outside the folder or
    cannot be decoded is a row here and a bad row when its image is read ("missing_file", "unsafe_path",
    "invalid_path", "unreadable_image", "unusable_image").
    """
    data_dir = Path(data_dir)
    metadata = data_dir / METADATA_FILE
    if not metadata.is_file():
        raise FileNotFoundError(
            f"{metadata} not found: a SURD dataset folder needs a {METADATA_FILE} with one JSON object per line "
            f'({{"{image_column}": ..., "{text_column}": ..., "{prompt_column}": ...}}); check --data.'
        )
    root = data_dir.resolve()
    rows: list[Row] = []
    bad: list[BadRow] = []
    columns = (image_column, text_column, prompt_column)
    with open(metadata, "rb") as f:
        for line, raw in enumerate(f):
            if not raw.strip():
                continue
            parsed = _checked_row(raw, line, root, columns)
            (rows if isinstance(parsed, Row) else bad).append(parsed)
    return rows, bad


def _checked_row(raw: bytes, line: int, root: Path, columns: tuple[str, str, str]) -> Row | BadRow:
    """`_parse_row`, with any exception it did not foresee turned into this row's "unexpected_error"."""
    record = _parse_json(raw, line)
    if isinstance(record, BadRow):
        return record
    try:  # a lone surrogate can only come from a \u escape: strict UTF-8 decoding refuses an encoded one
        return _parse_row(record, line, root, columns, escaped=b"\\u" in raw)
    except Exception as error:  # noqa: BLE001 - one row's failure is that row's bad row, never the run's
        return BadRow(line, _file_name(record, columns[0]), "unexpected_error", f"{type(error).__name__}: {error}")


def _parse_json(raw: bytes, line: int) -> dict | BadRow:
    try:  # a byte-order mark is tolerated on the first line only, where editors put it
        record = json.loads(raw.decode("utf-8-sig" if line == 0 else "utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        return BadRow(line, None, "malformed_json", f"line {line}: {error}")
    if not isinstance(record, dict):
        return BadRow(
            line, None, "malformed_json", f"line {line}: expected a JSON object, found {type(record).__name__}"
        )
    return record


def _parse_row(record: dict, line: int, root: Path, columns: tuple[str, str, str], *, escaped: bool) -> Row | BadRow:
    image_column, text_column, prompt_column = columns
    file_name = _file_name(record, image_column)
    for column in columns:
        value = record.get(column)
        if not isinstance(value, str):
            found = "no such key" if column not in record else f"a {type(value).__name__}"
            return BadRow(line, file_name, "missing_column", f"column {column!r}: expected a string, found {found}")
        if escaped and not _is_unicode(value):  # "\ud800" parses, but no tokenizer, hash or file system takes it
            detail = (
                f"column {column!r} holds {value!r}: a lone UTF-16 surrogate is not text; fix the line's \\u escape"
            )
            return BadRow(line, file_name, "invalid_text", detail)
    for column in (text_column, prompt_column):
        if not record[column].strip():
            return BadRow(line, file_name, "empty_prompt", f"column {column!r} is empty or whitespace")
    if "\x00" in file_name:
        return BadRow(line, file_name, "invalid_path", f"{file_name!r} holds a NUL byte, which no file name can")
    unsafe = _unsafe_name(file_name)
    if unsafe is not None:
        return BadRow(line, file_name, "unsafe_path", unsafe)
    return Row(line, file_name, root, record[text_column], record[prompt_column])


def _file_name(record: dict, image_column: str) -> str | None:
    """The row's file name for its bad-row record, if it is a string that can be written as UTF-8."""
    file_name = record.get(image_column)
    return file_name if isinstance(file_name, str) and _is_unicode(file_name) else None


def _is_unicode(text: str) -> bool:
    """False for a string holding a lone surrogate (it has no UTF-8 form)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _unsafe_name(file_name: str) -> str | None:
    """Why the name alone could leave the dataset folder (empty, absolute, `..`), or None; no file system call."""
    if not file_name.strip():
        return "file name is empty"
    if file_name.startswith("/"):
        return f"{file_name!r} is absolute; file names must be relative to the dataset folder"
    if ".." in file_name.split("/"):
        return f"{file_name!r} contains '..'; file names must stay inside the dataset folder"
    return None


def file_problem(row: Row) -> tuple[str, str] | None:
    """`(reason, detail)` when the row's file cannot be read safely, else None: the file-system half of the checks,
    made by the worker about to read the file.

    "unsafe_path": it resolves (through symlinks) outside the dataset folder; "missing_file": it does not exist or
    is not a regular file; "invalid_path": the OS cannot look it up (a symlink loop, a name longer than the file
    system allows, no permission).
    """
    try:
        resolved = row.path.resolve()
        if not resolved.is_relative_to(row.root):
            return (
                "unsafe_path",
                f"{row.file_name!r} resolves to {resolved}, outside the dataset folder {row.root} (symlink?)",
            )
        if not row.path.is_file():
            return "missing_file", f"{row.path} does not exist or is not a file"
    except (OSError, RuntimeError) as error:  # Python 3.11 raises RuntimeError for a symlink loop
        return "invalid_path", f"{row.file_name!r}: {type(error).__name__}: {error}"
    return None


def metadata_sha256(data_dir: str | Path) -> str:
    """Hex sha256 of the raw bytes of `data_dir/metadata.jsonl` (identifies the dataset in the manifest)."""
    return hashlib.sha256((Path(data_dir) / METADATA_FILE).read_bytes()).hexdigest()


def text_sha256(text: str) -> bytes:
    """The 32-byte sha256 of a prompt's UTF-8 bytes."""
    return hashlib.sha256(text.encode("utf-8")).digest()


def digest_array(digest: bytes) -> np.ndarray:
    """A 32-byte digest as the uint8[32] row the store keeps."""
    return np.frombuffer(digest, dtype=np.uint8).copy()


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB, respecting EXIF orientation.

    Transparent images (RGBA, LA, P with a transparency key) are composited on white, the usual choice for
    cut-out art; 16/32-bit integer greyscale (I;16*, I) is scaled from the 16-bit range to 8 bits rather than
    clipped; float images (F) are assumed to hold 0..255.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode.startswith("I"):
        values = np.asarray(image, dtype=np.float64) / 257.0
        return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L").convert("RGB")
    if image.mode == "F":
        values = np.clip(np.rint(np.asarray(image, dtype=np.float64)), 0, 255)
        return Image.fromarray(values.astype(np.uint8), "L").convert("RGB")
    return image.convert("RGB")


def oriented_size(image: Image.Image) -> tuple[int, int]:
    """(height, width) of the image as `to_rgb` turns it upright (EXIF orientations 5-8 swap the sides)."""
    width, height = image.size
    swapped = image.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8)
    return (width, height) if swapped else (height, width)


def crop_seed(seed: int, line: int) -> int:
    """The per-sample random-crop seed: a function of the run's seed and the row's line, nothing else.

    So a sample gets the same crop whatever worker, batch or process handles it, and on resume.
    """
    return int(np.random.SeedSequence([seed, line]).generate_state(1)[0])


def resized_long_side(size: tuple[int, int], resolution: int) -> int:
    """The long side after resizing the short side to `resolution`; refuses a resize PIL would not decode either.

    A 20000 x 2 strip decodes fine but would resize to gigabytes of pixels before the crop throws them away.
    """
    width, height = size
    # torchvision's arithmetic exactly: `int(height * (resolution / width))` is one pixel short for e.g. 49 x 98
    long_side = int(resolution * max(width, height) / min(width, height))
    if resolution * long_side > Image.MAX_IMAGE_PIXELS:
        raise ValueError(
            f"a {width} x {height} image resizes to {resolution} x {long_side} pixels before the crop, over PIL's "
            f"limit of {Image.MAX_IMAGE_PIXELS:,}: its aspect ratio is too extreme for --resolution {resolution}"
        )
    return long_side


def preprocess(
    image: Image.Image, resolution: int, crop: CropMode = "center", seed: int = 0
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Resize the shorter side to `resolution` (bilinear), crop a square, normalise to [-1, 1].

    Returns the `[3, resolution, resolution]` float32 tensor and the crop's (top, left) offset in the resized
    image. `crop="random"` draws the offset from `seed` (use `crop_seed(run_seed, line)`); "center" ignores it.
    The geometry follows torchvision's Resize + CenterCrop as used by the diffusers training scripts.
    """
    image = to_rgb(image)
    width, height = image.size
    long_side = resized_long_side(image.size, resolution)
    size = (resolution, long_side) if width <= height else (long_side, resolution)
    image = image.resize(size, Image.Resampling.BILINEAR)
    top, left = _crop_offset(size, resolution, crop, seed)
    image = image.crop((left, top, left + resolution, top + resolution))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
    return pixels.permute(2, 0, 1).contiguous(), (top, left)


def _crop_offset(size: tuple[int, int], resolution: int, crop: CropMode, seed: int) -> tuple[int, int]:
    width, height = size
    if crop == "center":
        return int(round((height - resolution) / 2.0)), int(round((width - resolution) / 2.0))
    if crop == "random":
        rng = np.random.default_rng(seed)
        return int(rng.integers(0, height - resolution + 1)), int(rng.integers(0, width - resolution + 1))
    raise ValueError(f"crop must be 'center' or 'random', found {crop!r}")


def load_image(data: bytes) -> Image.Image:
    """Decode image bytes fully (`.load()`), so truncated files fail here rather than later."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


class ImageDataset(torch.utils.data.Dataset):
    """Rows -> preprocessed images, decoded in the DataLoader workers.

    Each item is a dict that the default collate can batch:
      position        index into `rows` (int)
      line            the row's metadata line (int)
      pixels          float32 [3, R, R] in [-1, 1] (zeros if `error`)
      pixels_flipped  the horizontally mirrored pixels (only with `flip=True`)
      crop_offset     int64 [2]: (top, left) of the crop in the resized image
      original_size   int64 [2]: (height, width) of the decoded image, before the resize (SDXL's time ids)
      image_sha256    uint8 [32]: sha256 of the file's bytes (zeros if the file could not be read)
      error           "" when fine, else "<reason>: <detail>": unsafe_path, missing_file or invalid_path
                      (`file_problem`), unreadable_image (the file cannot be read or decoded), unusable_image
                      (it cannot be resized to the resolution) or unexpected_error (any other failure)
    """

    def __init__(self, rows: list[Row], resolution: int, crop: CropMode = "center", seed: int = 0, flip: bool = False):
        if crop not in ("center", "random"):
            raise ValueError(f"crop must be 'center' or 'random', found {crop!r}")
        self.rows = rows
        self.resolution = resolution
        self.crop = crop
        self.seed = seed
        self.flip = flip

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, position: int) -> dict:
        row = self.rows[position]
        item = {"position": position, "line": row.line, "image_sha256": torch.zeros(32, dtype=torch.uint8)}
        pixels, offset, size = torch.zeros(3, self.resolution, self.resolution), (0, 0), (0, 0)
        reason = "unexpected_error"  # checking the file; then reading and decoding it; then preparing it
        try:
            problem = file_problem(row)
            if problem is not None:
                raise _BadFile(*problem)
            reason = "unreadable_image"
            data = row.path.read_bytes()
            item["image_sha256"] = torch.from_numpy(digest_array(hashlib.sha256(data).digest()))
            image = load_image(data)
            size = oriented_size(image)
            reason = "unusable_image"  # decodes, but cannot be resized to this resolution
            resized_long_side(image.size, self.resolution)
            reason = "unexpected_error"
            pixels, offset = preprocess(image, self.resolution, self.crop, crop_seed(self.seed, row.line))
            error = ""
        except _BadFile as bad:
            error = f"{bad.reason}: {bad.detail}"
        except Exception as exc:  # noqa: BLE001 - any failure is this row's bad row, reported, not raised
            error = f"{reason}: {row.file_name}: {type(exc).__name__}: {exc}"
        item["pixels"] = pixels
        if self.flip:
            item["pixels_flipped"] = pixels.flip(-1)
        item["crop_offset"] = torch.tensor(offset, dtype=torch.int64)
        item["original_size"] = torch.tensor(size, dtype=torch.int64)
        item["error"] = error
        return item


class _BadFile(Exception):
    """A row's file failed `file_problem`: its reason and detail, passed to the item's `error`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail
