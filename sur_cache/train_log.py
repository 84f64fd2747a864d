"""The training log: one JSON object per optimizer step in `train_log.jsonl`, and a PNG of the loss curves.

A line holds `step`, `epoch`, each loss term (`denoise`, `distill`, `align`; null when the term is not computed),
`total`, `lr`, `grad_norm`, `samples_per_s`. On resume the lines after the checkpoint's step are dropped first, so
the file always reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

LOSS_TERMS = ("denoise", "distill", "align", "total")


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


def read_log(path: Path) -> list[dict[str, Any]]:
    """Every record of a `train_log.jsonl`, in order."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_losses(log_path: Path, png_path: Path) -> Path:
    """One panel per loss term against the step (log scale: the KL terms sit orders of magnitude below the MSE)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(log_path)
    # A run whose losses were all NaN or inf (fp16 overflow) still gets its (empty) total panel, not a crash.
    terms = [t for t in LOSS_TERMS if any(_finite(r.get(t)) for r in records)] or ["total"]
    figure, axes = plt.subplots(len(terms), 1, figsize=(7, 2.2 * len(terms)), sharex=True, squeeze=False)
    for axis, term in zip(axes[:, 0], terms, strict=True):
        points = [(r["step"], r[term]) for r in records if _finite(r.get(term))]
        if points:
            axis.plot(*zip(*points, strict=True), linewidth=1)
            if all(value > 0 for _, value in points):
                axis.set_yscale("log")
        else:
            axis.text(0.5, 0.5, "no finite value", ha="center", va="center", transform=axis.transAxes)
        axis.set_ylabel(term)
        axis.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("optimizer step")
    figure.suptitle(f"sur-cache train: {Path(log_path).parent.name}")
    figure.tight_layout()
    figure.savefig(png_path, dpi=100)
    plt.close(figure)
    return Path(png_path)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
