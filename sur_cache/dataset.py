"""SURD rows: reading `metadata.jsonl`, validating each row, and turning images into normalised pixel tensors.

A SURD dataset is a folder holding images and a `metadata.jsonl` with one JSON object per line,
`{"file_name": ..., "text": <simple prompt>, "prompt": <complex prompt>}` (column names configurable).

Validation is split in two on purpose. `read_metadata` does the cheap checks (JSON, columns, prompts, path
safety, file existence) in the main process. Decoding an image is the expensive check, so it happens in
`ImageDataset.__getitem__`, inside the DataLoader workers; a file that fails to decode comes back as a record
with an `error`, never as an exception, so one bad file does not kill a worker or the run.

One row never aborts the run: any exception while checking or preparing a row, foreseen or not, makes that row
a bad row with its reason (the exception's type and message for the unforeseen ones, "unexpected_error").
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageOps

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

CropMode = Literal["center", "random"]


@dataclass(frozen=True)
class Row:
    """One usable sample. `line` is its 0-based line in metadata.jsonl: the sample's stable identity."""

    line: int
    file_name: str
    path: Path
    text: str
    prompt: str


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
    """Parse `data_dir/metadata.jsonl` into usable rows and bad rows (with reasons); blank lines are ignored.

    Images are not decoded here (see `ImageDataset`); a row whose file exists but cannot be decoded is reported
    later as "unreadable_image".
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
    try:
        return _parse_row(record, line, root, columns)
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


def _parse_row(record: dict, line: int, root: Path, columns: tuple[str, str, str]) -> Row | BadRow:
    image_column, text_column, prompt_column = columns
    file_name = _file_name(record, image_column)
    for column in columns:
        value = record.get(column)
        if not isinstance(value, str):
            found = "no such key" if column not in record else f"a {type(value).__name__}"
            return BadRow(line, file_name, "missing_column", f"column {column!r}: expected a string, found {found}")
        if not _is_unicode(value):  # JSON's "\ud800" escape parses, but no tokenizer, hash or file system takes it
            detail = (
                f"column {column!r} holds {value!r}: a lone UTF-16 surrogate is not text; fix the line's \\u escape"
            )
            return BadRow(line, file_name, "invalid_text", detail)
    for column in (text_column, prompt_column):
        if not record[column].strip():
            return BadRow(line, file_name, "empty_prompt", f"column {column!r} is empty or whitespace")
    if "\x00" in file_name:
        return BadRow(line, file_name, "invalid_path", f"{file_name!r} holds a NUL byte, which no file name can")
    try:  # a symlink loop, a name longer than the file system allows (Errno 36), no permission to look it up
        path = _safe_path(root, file_name)
        is_file = not isinstance(path, str) and path.is_file()
    except (OSError, RuntimeError) as error:  # Python 3.11 raises RuntimeError for a symlink loop
        return BadRow(line, file_name, "invalid_path", f"{file_name!r}: {type(error).__name__}: {error}")
    if isinstance(path, str):
        return BadRow(line, file_name, "unsafe_path", path)
    if not is_file:
        return BadRow(line, file_name, "missing_file", f"{path} does not exist or is not a file")
    return Row(line, file_name, path, record[text_column], record[prompt_column])


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


def _safe_path(root: Path, file_name: str) -> Path | str:
    """The file's path if it stays inside `root` (symlinks resolved), else a message saying why not."""
    relative = Path(file_name)
    if not file_name.strip():
        return "file name is empty"
    if relative.is_absolute():
        return f"{file_name!r} is absolute; file names must be relative to the dataset folder"
    if ".." in relative.parts:
        return f"{file_name!r} contains '..'; file names must stay inside the dataset folder"
    resolved = (root / relative).resolve()
    if not resolved.is_relative_to(root):
        return f"{file_name!r} resolves to {resolved}, outside the dataset folder {root} (symlink?)"
    return root / relative


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
      image_sha256    uint8 [32]: sha256 of the file's bytes (zeros if the file could not be read)
      error           "" when fine, else "unreadable_image: <detail>" (the file cannot be read or decoded) or
                      "unexpected_error: <detail>" (any other failure preparing it)
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
        pixels, offset = torch.zeros(3, self.resolution, self.resolution), (0, 0)
        reason = "unreadable_image"  # reading and decoding; any failure after the size check was not foreseen
        try:
            data = row.path.read_bytes()
            item["image_sha256"] = torch.from_numpy(digest_array(hashlib.sha256(data).digest()))
            image = load_image(data)
            reason = "unusable_image"  # decodes, but cannot be resized to this resolution
            resized_long_side(image.size, self.resolution)
            reason = "unexpected_error"
            pixels, offset = preprocess(image, self.resolution, self.crop, crop_seed(self.seed, row.line))
            error = ""
        except Exception as exc:  # noqa: BLE001 - any failure is this row's bad row, reported, not raised
            error = f"{reason}: {row.file_name}: {type(exc).__name__}: {exc}"
        item["pixels"] = pixels
        if self.flip:
            item["pixels_flipped"] = pixels.flip(-1)
        item["crop_offset"] = torch.tensor(offset, dtype=torch.int64)
        item["error"] = error
        return item
