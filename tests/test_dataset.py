"""SURD reading: every kind of bad row with its reason, mode conversion, crop geometry, per-line random crops."""

import dataclasses
import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from sur_cache import dataset
from sur_cache.dataset import (
    BAD_ROW_REASONS,
    ImageDataset,
    Row,
    metadata_sha256,
    preprocess,
    read_metadata,
    text_sha256,
    to_rgb,
)


def _write_metadata(folder, lines):
    (folder / "metadata.jsonl").write_text("".join(line + "\n" for line in lines))


def _row(file_name, text="a red circle", prompt="red circle, artstation"):
    return json.dumps({"file_name": file_name, "text": text, "prompt": prompt})


@pytest.fixture
def messy_dataset(tmp_path):
    """One dataset with every kind of bad row, keyed by the 0-based metadata line each sits on."""
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    Image.new("RGB", (40, 30), (10, 200, 30)).save(data / "images" / "good.png")
    Image.new("RGB", (40, 30), (1, 2, 3)).save(data / "images" / "no_extension", format="PNG")
    Image.new("RGB", (40, 30)).save(tmp_path / "outside.png")
    png = (data / "images" / "good.png").read_bytes()
    (data / "images" / "truncated.png").write_bytes(png[: len(png) // 2])
    (data / "images" / "not_an_image.png").write_text("hello, I am text")
    (data / "images" / "escape.png").symlink_to(tmp_path / "outside.png")
    _write_metadata(
        data,
        [
            _row("images/good.png"),  # 0
            '{"file_name": "images/good.png", "text": ',  # 1
            json.dumps({"file_name": "images/good.png", "text": "a red circle"}),  # 2: no prompt column
            _row("images/good.png", prompt="   "),  # 3
            _row("../outside.png"),  # 4 (the file exists: refused for the path alone)
            _row("/etc/passwd"),  # 5
            _row("images/missing.png"),  # 6
            _row("images/escape.png"),  # 7: a symlink pointing outside the folder
            _row("images/truncated.png"),  # 8
            _row("images/not_an_image.png"),  # 9
            _row("images/no_extension"),  # 10
            "",  # 11: blank lines are not rows
            "[1, 2, 3]",  # 12
            json.dumps({"file_name": "images/good.png", "text": "", "prompt": "x"}),  # 13
            json.dumps({"file_name": 7, "text": "t", "prompt": "p"}),  # 14
        ],
    )
    return data


def test_read_metadata_reports_each_bad_row_with_its_reason(messy_dataset):
    rows, bad = read_metadata(messy_dataset)
    reasons = {b.line: b.reason for b in bad}
    assert reasons == {
        1: "malformed_json",
        2: "missing_column",
        3: "empty_prompt",
        4: "unsafe_path",
        5: "unsafe_path",
        12: "malformed_json",
        13: "empty_prompt",
        14: "missing_column",
    }
    assert all(b.reason in BAD_ROW_REASONS and b.detail for b in bad)
    assert "'prompt'" in next(b.detail for b in bad if b.line == 2)
    # the file-system checks are the workers' (below): a missing file or an escaping symlink is a row here
    assert [r.line for r in rows] == [0, 6, 7, 8, 9, 10]
    assert rows[0].path == messy_dataset.resolve() / "images" / "good.png"
    assert (rows[0].text, rows[0].prompt) == ("a red circle", "red circle, artstation")


def test_image_dataset_returns_file_and_decode_failures_as_records(messy_dataset):
    rows, _ = read_metadata(messy_dataset)
    items = {item["line"]: item for item in ImageDataset(rows, resolution=16)}
    assert items[0]["error"] == "" and items[10]["error"] == ""
    assert items[6]["error"].startswith("missing_file: ") and "missing.png does not exist" in items[6]["error"]
    assert items[7]["error"].startswith("unsafe_path: 'images/escape.png' resolves to ")
    assert "outside the dataset folder" in items[7]["error"]
    for line in (8, 9):
        assert items[line]["error"].startswith("unreadable_image: images/")
    for line in (6, 7, 8, 9):
        assert torch.equal(items[line]["pixels"], torch.zeros(3, 16, 16))
        assert items[line]["error"].split(": ", 1)[0] in BAD_ROW_REASONS
    assert not items[7]["image_sha256"].any()  # the file outside the folder was never read
    # a mixed batch still collates, so DataLoader workers never die on a bad file
    batch = torch.utils.data.default_collate(list(items.values()))
    assert batch["pixels"].shape == (6, 3, 16, 16)
    assert batch["image_sha256"].shape == (6, 32) and batch["image_sha256"].dtype == torch.uint8


def test_the_metadata_pass_makes_no_file_system_call_per_row(messy_dataset, monkeypatch):
    """Streaming 1M rows must not cost 1M stats and resolves: those checks are made when a worker reads the file."""
    from pathlib import Path

    calls = []
    real_resolve, real_is_file = Path.resolve, Path.is_file
    with monkeypatch.context() as patch:
        patch.setattr(Path, "resolve", lambda self, strict=False: calls.append(self) or real_resolve(self, strict))
        patch.setattr(Path, "is_file", lambda self: calls.append(self) or real_is_file(self))
        rows, _ = read_metadata(messy_dataset)
    assert len(rows) == 6
    assert calls == [messy_dataset / "metadata.jsonl", messy_dataset]  # the file itself and the folder, once


def _os_refused_dataset(tmp_path):
    """Rows whose text is not Unicode or whose file name the OS cannot look up, between two good rows."""
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(data / "images" / "good.png")
    (data / "images" / "loop_a").symlink_to("loop_b")
    (data / "images" / "loop_b").symlink_to("loop_a")
    lines = [
        _row("images/good.png"),  # 0
        '{"file_name": "images/good.png", "text": "a lone \\ud800 surrogate", "prompt": "p"}',  # 1: valid JSON
        '{"file_name": "images/good.png", "text": "t", "prompt": "\\udfff"}',  # 2
        '{"file_name": "images/\\ud800.png", "text": "t", "prompt": "p"}',  # 3
        _row("images/loop_a"),  # 4: a symlink loop
        _row("images/go\x00od.png"),  # 5: a NUL byte
        _row("images/" + "a" * 300 + ".png"),  # 6: longer than any file-system name (Errno 36)
        _row("images/good.png"),  # 7
    ]
    _write_metadata(data, lines)
    return data


def test_text_that_is_not_unicode_and_paths_the_os_refuses_are_bad_rows(tmp_path):
    rows, bad = read_metadata(_os_refused_dataset(tmp_path))
    assert [r.line for r in rows] == [0, 4, 6, 7]
    assert [(b.line, b.reason) for b in bad] == [
        (1, "invalid_text"),
        (2, "invalid_text"),
        (3, "invalid_text"),
        (5, "invalid_path"),
    ]
    details = {b.line: b.detail for b in bad}
    assert "'text'" in details[1] and "'prompt'" in details[2] and "'file_name'" in details[3]
    assert "surrogate" in details[1] and "NUL" in details[5]
    # the OS's refusals come from the worker that would read the file
    errors = {item["line"]: item["error"] for item in ImageDataset(rows, resolution=8)}
    assert errors[0] == errors[7] == ""
    assert errors[4].startswith("invalid_path: ") and "loop" in errors[4].lower()
    assert errors[6].startswith("invalid_path: ") and "too long" in errors[6]
    assert all(b.reason in BAD_ROW_REASONS for b in bad)
    # every record can be written as UTF-8 JSON (skipped.jsonl) and printed: no lone surrogate survives in it
    for b in bad:
        json.dumps(dataclasses.asdict(b), ensure_ascii=False).encode("utf-8")


def test_an_unexpected_error_in_one_row_skips_that_row_only(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8)).save(data / name)
    _write_metadata(data, [_row("a.png"), _row("b.png")])
    real_unsafe_name = dataset._unsafe_name

    def fails_on_b(file_name):
        if file_name == "b.png":
            raise TypeError("an unforeseen failure")
        return real_unsafe_name(file_name)

    monkeypatch.setattr(dataset, "_unsafe_name", fails_on_b)
    rows, bad = read_metadata(data)
    assert [r.line for r in rows] == [0]
    assert [(b.line, b.file_name, b.reason, b.detail) for b in bad] == [
        (1, "b.png", "unexpected_error", "TypeError: an unforeseen failure")
    ]


def test_image_dataset_returns_an_unexpected_error_as_a_record(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8)).save(data / name)
    _write_metadata(data, [_row("a.png"), _row("b.png")])
    rows, _ = read_metadata(data)
    real_preprocess = dataset.preprocess

    def fails_on_blue(image, *args, **kwargs):
        if image.size == (9, 9):
            raise TypeError("an unforeseen failure")
        return real_preprocess(image, *args, **kwargs)

    Image.new("RGB", (9, 9), "blue").save(data / "b.png")
    monkeypatch.setattr(dataset, "preprocess", fails_on_blue)
    items = list(ImageDataset(rows, resolution=8, flip=True))
    assert items[0]["error"] == ""
    assert items[1]["error"] == "unexpected_error: b.png: TypeError: an unforeseen failure"
    assert torch.equal(items[1]["pixels"], torch.zeros(3, 8, 8))
    assert bytes(items[1]["image_sha256"].tolist()) == hashlib.sha256((data / "b.png").read_bytes()).digest()
    assert torch.utils.data.default_collate(items)["pixels_flipped"].shape == (2, 3, 8, 8)


def test_invalid_utf8_is_a_malformed_line_and_a_leading_bom_is_tolerated(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (8, 8)).save(data / "a.png")
    good = _row("a.png").encode()
    (data / "metadata.jsonl").write_bytes(b"\xef\xbb\xbf" + good + b"\n" + good[:-2] + b'\xff"}\n' + good + b"\n")
    rows, bad = read_metadata(data)
    assert [r.line for r in rows] == [0, 2]
    assert [(b.line, b.reason) for b in bad] == [(1, "malformed_json")]


def test_configurable_columns(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (8, 8)).save(data / "a.jpg")
    _write_metadata(data, [json.dumps({"image": "a.jpg", "simple": "a cat", "complex": "cat, 8k"})])
    rows, bad = read_metadata(data, text_column="simple", prompt_column="complex", image_column="image")
    assert bad == [] and (rows[0].file_name, rows[0].text, rows[0].prompt) == ("a.jpg", "a cat", "cat, 8k")
    rows, bad = read_metadata(data)
    assert rows == [] and [b.reason for b in bad] == ["missing_column"]


def test_missing_metadata_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="metadata.jsonl"):
        read_metadata(tmp_path)


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        (Image.new("L", (4, 4), 100), (100, 100, 100)),
        (Image.new("RGBA", (4, 4), (255, 0, 0, 0)), (255, 255, 255)),  # fully transparent -> white
        (Image.new("RGBA", (4, 4), (255, 0, 0, 255)), (255, 0, 0)),
        (Image.new("LA", (4, 4), (0, 0)), (255, 255, 255)),
        (Image.new("CMYK", (4, 4), (0, 0, 0, 0)), (255, 255, 255)),
        (Image.new("I;16", (4, 4), 65535), (255, 255, 255)),  # 16-bit is scaled, not clipped
        (Image.new("I;16", (4, 4), 257 * 10), (10, 10, 10)),
        (Image.new("1", (4, 4), 1), (255, 255, 255)),
        (Image.new("RGB", (4, 4), (1, 2, 3)).convert("P", palette=Image.Palette.ADAPTIVE), (1, 2, 3)),
    ],
    ids=["L", "RGBA-transparent", "RGBA-opaque", "LA", "CMYK", "I;16-max", "I;16", "1", "P"],
)
def test_any_mode_becomes_rgb(image, expected):
    rgb = to_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == image.size
    assert rgb.getpixel((0, 0)) == expected


def test_transparent_palette_image_is_composited_on_white():
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0] * 256)
    image.info["transparency"] = 0
    assert to_rgb(image).getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16"])
def test_saved_files_of_any_mode_decode_to_rgb_pixels(tmp_path, mode):
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    white = Image.new("RGB", (20, 12), (255, 255, 255))
    # a real 16-bit file spans 0..65535; Pillow's RGB -> I;16 conversion would only copy the 8-bit values
    image = Image.fromarray(np.full((12, 20), 65535, np.uint16)) if mode == "I;16" else white.convert(mode)
    image.save(path)
    item = ImageDataset([Row(0, path.name, tmp_path.resolve(), "t", "p")], resolution=8)[0]
    assert item["error"] == ""
    assert item["pixels"].shape == (3, 8, 8)
    assert torch.allclose(item["pixels"], torch.ones(3, 8, 8), atol=2 / 255)


def test_preprocess_resizes_shorter_side_then_center_crops():
    # 64 wide x 32 high, each column a different grey: resize to 32 x 16, crop 16 x 16 from the middle
    columns = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (32, 1))
    image = Image.fromarray(columns, "L")
    pixels, offset = preprocess(image, 16, "center")
    assert pixels.shape == (3, 16, 16) and pixels.dtype == torch.float32
    assert offset == (0, 8)
    resized = np.asarray(image.convert("RGB").resize((32, 16), Image.Resampling.BILINEAR), dtype=np.float32)
    expected = torch.from_numpy(resized[:, 8:24] / 127.5 - 1).permute(2, 0, 1)
    assert torch.allclose(pixels, expected)
    tall, offset = preprocess(Image.new("RGB", (30, 90)), 10, "center")
    assert tall.shape == (3, 10, 10) and offset == (10, 0)


@pytest.mark.parametrize(("size", "resized"), [((49, 98), (32, 64)), ((98, 49), (64, 32)), ((49, 49), (32, 32))])
def test_preprocess_long_side_follows_torchvision_arithmetic(size, resized):
    """torchvision's Resize gives the long side int(32 * 98 / 49) = 64; int(98 * (32 / 49)) would give 63."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    pixels, offset = preprocess(image, 32, "center")
    resized_image = np.asarray(image.resize(resized, Image.Resampling.BILINEAR), dtype=np.float32)
    top, left = (resized[1] - 32) // 2, (resized[0] - 32) // 2
    assert offset == (top, left)
    expected = torch.from_numpy(resized_image[top : top + 32, left : left + 32] / 127.5 - 1).permute(2, 0, 1)
    assert torch.equal(pixels, expected)


def test_preprocess_range_is_minus_one_to_one():
    white, _ = preprocess(Image.new("RGB", (24, 24), (255, 255, 255)), 8)
    black, _ = preprocess(Image.new("RGB", (24, 24), (0, 0, 0)), 8)
    assert torch.equal(white, torch.ones(3, 8, 8)) and torch.equal(black, -torch.ones(3, 8, 8))


def test_preprocess_upscales_small_images():
    pixels, offset = preprocess(Image.new("RGB", (5, 3)), 12)
    assert pixels.shape == (3, 12, 12) and offset == (0, 4)


def test_random_crop_depends_only_on_seed_and_line(demo_dataset):
    rows, _ = read_metadata(demo_dataset)
    dataset = ImageDataset(rows, resolution=32, crop="random", seed=3, flip=True)
    forward = {item["line"]: item for item in dataset}
    backward = {dataset[i]["line"]: dataset[i] for i in reversed(range(len(dataset)))}
    loader = torch.utils.data.DataLoader(dataset, batch_size=5, num_workers=2, shuffle=True)
    batched = {}
    for batch in loader:
        for j, line in enumerate(batch["line"].tolist()):
            batched[line] = (batch["crop_offset"][j], batch["pixels"][j])
    for line, item in forward.items():
        assert torch.equal(item["crop_offset"], backward[line]["crop_offset"])
        assert torch.equal(item["crop_offset"], batched[line][0])
        assert torch.equal(item["pixels"], batched[line][1])
        assert torch.equal(item["pixels_flipped"], item["pixels"].flip(-1))
    offsets = {tuple(item["crop_offset"].tolist()) for item in forward.values()}
    assert len(offsets) > 1, "random crops should vary across lines"
    other_seed = ImageDataset(rows, resolution=32, crop="random", seed=4)
    assert any(not torch.equal(other_seed[i]["crop_offset"], forward[rows[i].line]["crop_offset"]) for i in range(12))


def test_hashes(demo_dataset, tmp_path):
    rows, _ = read_metadata(demo_dataset)
    item = ImageDataset(rows, resolution=32)[0]
    assert bytes(item["image_sha256"].tolist()) == hashlib.sha256(rows[0].path.read_bytes()).digest()
    assert text_sha256("café") == hashlib.sha256("café".encode()).digest()
    copy = shutil.copytree(demo_dataset, tmp_path / "copy")
    assert metadata_sha256(copy) == metadata_sha256(demo_dataset)
    with open(copy / "metadata.jsonl", "a") as f:
        f.write("\n")
    assert metadata_sha256(copy) != metadata_sha256(demo_dataset)


def test_unknown_crop_mode_is_refused():
    with pytest.raises(ValueError, match="crop must be"):
        ImageDataset([], resolution=8, crop="middle")


def test_an_extreme_strip_is_refused_before_it_is_resized_to_gigabytes(tmp_path):
    strip = Image.new("RGB", (40000, 2), (10, 20, 30))  # 512 px tall after the resize: 512 x 10,240,000 pixels
    with pytest.raises(ValueError, match=r"40000 x 2 image resizes to 512 x 10240000 pixels"):
        preprocess(strip, 512)
    strip.save(tmp_path / "strip.png")
    row = Row(0, "strip.png", tmp_path.resolve(), "a strip", "a long strip")
    item = ImageDataset([row], 512)[0]
    assert item["error"].startswith("unusable_image: strip.png: ValueError: a 40000 x 2 image resizes")
    assert not item["pixels"].any()
