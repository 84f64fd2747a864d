"""A small synthetic dataset in SURD's format (image folder + metadata.jsonl), for the demo and the tests.

Each image is a coloured shape on a coloured background; its simple prompt narrates the scene in plain words and
its complex prompt lists keywords, the way SURD pairs a narrative prompt with a keyword-laden one.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

_COLOURS = {
    "red": (200, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 70, 200),
    "yellow": (230, 200, 40),
    "purple": (130, 50, 160),
    "white": (235, 235, 235),
    "black": (20, 20, 20),
    "orange": (240, 130, 30),
}
_SHAPES = ["circle", "square", "triangle"]
_PLACES = ["in a quiet park", "on a busy street", "by the sea", "in a small kitchen", "under the night sky"]
_STYLES = [
    "highly detailed, digital painting, artstation",
    "oil on canvas, dramatic lighting",
    "photorealistic, 8k, sharp focus",
    "watercolor, soft pastel colors",
]


def _draw(shape: str, fg: tuple[int, int, int], bg: tuple[int, int, int], size: tuple[int, int]) -> Image.Image:
    image = Image.new("RGB", size, bg)
    w, h = size
    box = (w // 4, h // 4, 3 * w // 4, 3 * h // 4)
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse(box, fill=fg)
    elif shape == "square":
        draw.rectangle(box, fill=fg)
    else:
        draw.polygon([(w // 2, h // 4), (w // 4, 3 * h // 4), (3 * w // 4, 3 * h // 4)], fill=fg)
    return image


def build_demo_dataset(folder: Path, num_samples: int = 32, seed: int = 0) -> Path:
    """Write `num_samples` images of varied sizes and modes plus `metadata.jsonl` into `folder`; returns `folder`."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    colours = list(_COLOURS)
    rows = []
    for i in range(num_samples):
        shape, fg, bg = rng.choice(_SHAPES), *rng.sample(colours, 2)
        place, style = rng.choice(_PLACES), rng.choice(_STYLES)
        size = (rng.choice([48, 64, 80]), rng.choice([48, 64, 96]))
        image = _draw(shape, _COLOURS[fg], _COLOURS[bg], size)
        name = f"images/{i:05d}.png" if i % 3 else f"images/{i:05d}.jpg"
        (image.convert("L") if i % 7 == 3 else image).save(folder / name)
        rows.append(
            {
                "file_name": name,
                "text": f"a {fg} {shape} waits {place}",
                "prompt": f"{fg} {shape}, {bg} background, {place}, {style}",
            }
        )
    with open(folder / "metadata.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return folder
