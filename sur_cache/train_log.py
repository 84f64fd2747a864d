"""The training log: one JSON object per line in `train_log.jsonl`, and a PNG of the loss curves.

Two kinds of record, told apart by `kind`:
  "step"        one per optimizer step: `step`, `epoch`, each loss term (`denoise`, `distill`, `align`; null when
                the term is not computed), `total`, `lr`, `grad_norm`, `samples_per_s`. A line without `kind` (a
                log of an older sur-cache) is a step record.
  "validation"  one per validation (`--val-fraction`): `step`, `epoch`, `samples`, the same loss terms and `total`
                as means over the held-out samples, `weights` (of each term in the total), and the two cosines
                `cosine_adapted_complex` and `cosine_simple_complex` (sur_cache/validation.py).
On resume the lines after the checkpoint's step are dropped first, so the file always reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

LOSS_TERMS = ("denoise", "distill", "align", "total")
STEP, VALIDATION = "step", "validation"
COSINES = {  # the validation record's embedding scores, as the plot labels them
    "cosine_adapted_complex": "adapter(simple) vs CLIP(complex)",
    "cosine_simple_complex": "CLIP(simple) vs CLIP(complex)",
}


class StepLog:
    """Appends step records to a JSON-lines file (main process only; other processes pass `enabled=False`)."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path, self.enabled = Path(path), enabled

    def truncate_after(self, step: int) -> None:
        """Keep only the records of steps <= `step` (the last checkpoint's), dropping what a crash left behind:
        later records, a last line the crash cut short, and any line that is no step record."""
        if not self.enabled or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and type(record.get("step")) is int and record["step"] <= step:
                kept.append(record)
        self.path.write_text("".join(json.dumps(record) + "\n" for record in kept))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def read_log(path: Path, kind: str | None = STEP) -> list[dict[str, Any]]:
    """The records of a `train_log.jsonl` of one kind (STEP, VALIDATION; None: every record), in order."""
    records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [r for r in records if kind is None or r.get("kind", STEP) == kind]


def plot_losses(log_path: Path, png_path: Path) -> Path:
    """One panel per loss term against the step (log scale: the KL terms sit orders of magnitude below the MSE), the
    validation means drawn as points over the training curve; with validation, a last panel of the two cosines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records, validations = read_log(log_path), read_log(log_path, VALIDATION)
    # A run whose losses were all NaN or inf (fp16 overflow) still gets its (empty) total panel, not a crash.
    terms = [t for t in LOSS_TERMS if any(_finite(r.get(t)) for r in records + validations)] or ["total"]
    panels = len(terms) + bool(validations)
    figure, axes = plt.subplots(panels, 1, figsize=(7, 2.2 * panels), sharex=True, squeeze=False)
    for axis, term in zip(axes[:, 0], terms, strict=False):
        drawn = [
            _draw(axis, records, term, label="train", linewidth=1),
            _draw(axis, validations, term, label="validation", marker="o", linewidth=1),
        ]
        if not any(drawn):
            axis.text(0.5, 0.5, "no finite value", ha="center", va="center", transform=axis.transAxes)
        elif all(value > 0 for points in drawn for _, value in points):
            axis.set_yscale("log")
        if validations:
            axis.legend(fontsize="small")
        axis.set_ylabel(term)
        axis.grid(alpha=0.3)
    if validations:
        axis = axes[-1, 0]
        for name, label in COSINES.items():
            _draw(axis, validations, name, label=label, marker="o", linewidth=1)
        axis.set_ylabel("cosine to\nCLIP(complex)")
        axis.legend(fontsize="small")
        axis.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("optimizer step")
    figure.suptitle(f"sur-cache train: {Path(log_path).parent.name}")
    figure.tight_layout()
    figure.savefig(png_path, dpi=100)
    plt.close(figure)
    return Path(png_path)


def _draw(axis, records: list[dict[str, Any]], name: str, **style) -> list[tuple[int, float]]:
    """Plot `name` against the step over the records where it is finite; returns the points drawn."""
    points = [(r["step"], r[name]) for r in records if _finite(r.get(name))]
    if points:
        axis.plot(*zip(*points, strict=True), **style)
    return points


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
