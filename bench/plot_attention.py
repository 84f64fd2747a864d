"""Draw the PNG of an attention benchmark CSV (bench/results/attention_<gpu>.csv) written by bench_attention.py.

One panel per (mode, width) for the core: median time against batch size, one line per provider; a last row of
panels shows the whole adapter's forward+backward per provider. Usage: python bench/plot_attention.py CSV [PNG]
"""

from __future__ import annotations

import csv
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MODES = ("forward", "forward+backward")
# One colour per provider in every panel (compile rows exist for some widths only).
COLOURS = {"eager": "tab:blue", "sdpa": "tab:orange", "compile": "tab:purple", "fused": "tab:green"}
COLOURS["fused+graph"] = "tab:red"


def read_ok_rows(csv_path: Path) -> list[dict]:
    with csv_path.open(newline="") as handle:
        return [row for row in csv.DictReader(handle) if row["status"] == "ok" and row["p50_us"]]


def plot_attention_csv(csv_path: Path, png_path: Path | None = None) -> Path:
    """Plot the rows of csv_path (one GPU) into png_path (default: the CSV's name with .png); returns the path."""
    rows = read_ok_rows(csv_path)
    png_path = png_path or csv_path.with_suffix(".png")
    widths = sorted({int(row["d"]) for row in rows if row["kernel"] in ("core", "adapter")})
    if not widths:
        raise ValueError(f"{csv_path} has no successful core or adapter rows to plot")
    figure, axes = plt.subplots(3, len(widths), figsize=(5 * len(widths), 12), squeeze=False)
    gpu = rows[0]["gpu"]
    for column, width in enumerate(widths):
        for line, mode in enumerate(MODES):
            plot_core_panel(axes[line][column], rows, mode, width)
        plot_adapter_panel(axes[2][column], rows, width)
    core = next(row for row in rows if row["kernel"] in ("core", "adapter"))
    figure.suptitle(f"softmax(QK^T/sqrt(d))V + V, L={core['L']}, {core['dtype']}, {gpu} (median of do_bench)")
    figure.tight_layout()
    figure.savefig(png_path, dpi=110)
    plt.close(figure)
    return png_path


def plot_core_panel(axis, rows: list[dict], mode: str, width: int) -> None:
    series = defaultdict(list)
    for row in rows:
        if row["kernel"] == "core" and row["mode"] == mode and int(row["d"]) == width:
            series[row["provider"]].append((int(row["B"]), float(row["p50_us"])))
    for provider, points in sorted(series.items()):
        batches, times = zip(*sorted(points), strict=True)
        axis.plot(batches, times, marker="o", label=provider, color=COLOURS.get(provider))
    axis.set(
        xscale="log", yscale="log", xlabel="batch size B", ylabel="median time (us)", title=f"core {mode}, d={width}"
    )
    axis.grid(True, which="both", alpha=0.3)
    if series:
        axis.legend(fontsize=8)


def plot_adapter_panel(axis, rows: list[dict], width: int) -> None:
    adapter = [row for row in rows if row["kernel"] == "adapter" and int(row["d"]) == width]
    labels = [f"{row['provider']}\nB={row['B']}" for row in adapter]
    axis.bar(labels, [float(row["p50_us"]) / 1e3 for row in adapter])
    axis.set(ylabel="median time (ms)", title=f"whole adapter forward+backward, d={width}")
    axis.tick_params(axis="x", labelsize=8)


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: python bench/plot_attention.py CSV [PNG]")
    print(plot_attention_csv(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) == 3 else None))
