"""The files `sur-cache evaluate` writes: report.html (what a person opens first), chart.png, metrics.json, scores.csv.

`report.html` is self-contained: inline CSS, no script, no network; the images sit beside it under `images/` and
the chart beside it, all linked by relative paths, so the folder opens from disk in any browser and can be moved
or zipped whole. Every text from the prompts file is HTML-escaped. The grid lists the prompts by the size of their
difference (adapted minus base, against the simple prompt), so the biggest wins and the biggest losses come first.
"""

from __future__ import annotations

import csv
import html
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from sur_cache.eval_prompts import EvalPrompt
from sur_cache.scoring import CONFIDENCE, VARIANTS, GroupSummary, PromptResult

REPORT_FILE = "report.html"
CHART_FILE = "chart.png"
METRICS_FILE = "metrics.json"
SCORES_FILE = "scores.csv"
IMAGES_FOLDER = "images"
REPORT_FILES = (REPORT_FILE, CHART_FILE, METRICS_FILE, SCORES_FILE)
TARGETS = ("simple", "complex")  # what an image is scored against: its simple prompt, and its complex one if any
SCORES_COLUMNS = ("prompt", "category", "seed", "variant", "against", "score", "image")


@dataclass(frozen=True)
class ScoredImage:
    """One generated image: which prompt (its index), seed and variant, its file under the report folder, its scores
    against each target it has (`{"simple": ..., "complex": ...}`)."""

    prompt: int
    seed: int
    variant: str
    file: str
    scores: dict[str, float]


@dataclass(frozen=True)
class TargetResults:
    """Everything scored against one target: per prompt, per category, and over all prompts."""

    target: str
    prompts: tuple[PromptResult, ...]
    categories: tuple[GroupSummary, ...]
    overall: GroupSummary


@dataclass(frozen=True)
class Evaluation:
    """A finished evaluation: the prompts, every image with its scores, the statistics per target, the settings."""

    prompts: tuple[EvalPrompt, ...]
    images: tuple[ScoredImage, ...]
    targets: tuple[TargetResults, ...]
    settings: dict


def image_file(prompt: int, seed: int, variant: str) -> str:
    """Where the image of prompt number `prompt`, `seed` and `variant` goes, relative to the report folder."""
    return f"{IMAGES_FOLDER}/prompt{prompt:03d}-seed{seed}-{variant}.png"


def write_report(out: Path, evaluation: Evaluation) -> Path:
    """Write report.html, chart.png, metrics.json and scores.csv into `out` (the images are already there)."""
    out = Path(out)
    write_chart(out / CHART_FILE, evaluation.targets)
    (out / METRICS_FILE).write_text(json.dumps(metrics(evaluation), indent=2) + "\n", encoding="utf-8")
    write_scores(out / SCORES_FILE, evaluation)
    (out / REPORT_FILE).write_text(render_html(evaluation), encoding="utf-8")
    return out / REPORT_FILE


def format_summary(evaluation: Evaluation) -> str:
    """What `sur-cache evaluate` prints at the end: the overall result per target, and where the report is."""
    lines = []
    for target in evaluation.targets:
        overall = target.overall
        low, high = overall.difference_interval
        lines.append(
            f"vs {target.target:<8} base {overall.base_mean:.2f}  adapted {overall.adapted_mean:.2f}  difference "
            f"{overall.difference:+.2f} [{low:+.2f}, {high:+.2f}]  win rate {overall.win_rate:.0%} "
            f"({overall.wins}/{overall.prompts} prompts)"
        )
    lines.append(f"report      {Path(evaluation.settings['out']) / REPORT_FILE}")
    return "\n".join(lines)


def metrics(evaluation: Evaluation) -> dict:
    """metrics.json: the settings, then per target the overall and per-category summaries and every prompt's result."""
    return {
        "settings": evaluation.settings,
        "confidence": CONFIDENCE,
        "targets": {
            target.target: {
                "overall": asdict(target.overall),
                "categories": [asdict(summary) for summary in target.categories],
                "prompts": [_prompt_record(evaluation.prompts[result.index], result) for result in target.prompts],
            }
            for target in evaluation.targets
        },
    }


def _prompt_record(prompt: EvalPrompt, result: PromptResult) -> dict:
    return {
        "index": result.index,
        "text": prompt.text,
        "complex": prompt.complex,
        "category": result.category,
        "base": list(result.base),
        "adapted": list(result.adapted),
        "difference": result.difference,
        "win": result.win,
    }


def write_scores(path: Path, evaluation: Evaluation) -> None:
    """scores.csv, tidy: one row per image and target (prompt, category, seed, variant, against, score, image)."""
    with Path(path).open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(SCORES_COLUMNS)
        for image in evaluation.images:
            prompt = evaluation.prompts[image.prompt]
            for target, score in image.scores.items():
                writer.writerow([prompt.text, _category(prompt), image.seed, image.variant, target, score, image.file])


def _category(prompt: EvalPrompt) -> str:
    return prompt.category or ""


def write_chart(path: Path, targets: Sequence[TargetResults]) -> None:
    """One panel per target: base and adapted mean per category and overall, each with its 95% interval."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4 + 1.6 * max(len(t.categories) + 1 for t in targets), 3.6 * len(targets)))
    axes = figure.subplots(len(targets), 1, squeeze=False)[:, 0]
    for axis, target in zip(axes, targets, strict=True):
        groups = [*target.categories, target.overall]
        positions = range(len(groups))
        for offset, variant, colour in ((-0.2, VARIANTS[0], "#9e9e9e"), (0.2, VARIANTS[1], "#1f77b4")):
            means = [getattr(group, f"{variant}_mean") for group in groups]
            errors = _error_bars(means, [getattr(group, f"{variant}_interval") for group in groups])
            axis.bar([p + offset for p in positions], means, 0.4, yerr=errors, capsize=3, color=colour, label=variant)
        axis.set_xticks(list(positions), [_tick_label(group) for group in groups], fontsize=8)
        axis.set_ylabel(f"CLIP score vs {target.target} prompt")
        axis.legend(fontsize=8)
        axis.grid(axis="y", alpha=0.3)
    figure.suptitle(f"base vs adapted, mean per category with {CONFIDENCE:.0%} bootstrap intervals", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def _error_bars(means: list[float], intervals: list[tuple[float, float]]) -> list[list[float]]:
    """matplotlib's `yerr`: the distances from each mean down to its interval's low end and up to its high end."""
    pairs = list(zip(means, intervals, strict=True))
    return [[mean - low for mean, (low, _) in pairs], [high - mean for mean, (_, high) in pairs]]


def _tick_label(group: GroupSummary) -> str:
    low, high = group.difference_interval
    return f"{group.group}\n\u0394 {group.difference:+.2f} [{low:+.2f}, {high:+.2f}]"


# ----------------------------------------------------------------------------------------------------- the HTML

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin-bottom: 1.5em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th:first-child, td:first-child, td.text { text-align: left; }
tr.overall { font-weight: bold; background: #f4f4f4; }
.win { color: #1a7f37; } .loss { color: #c62828; }
figure { display: inline-block; margin: 2px; text-align: center; font-size: 11px; }
img.sample { width: 128px; height: 128px; image-rendering: pixelated; }
"""


def render_html(evaluation: Evaluation) -> str:
    """The report page: settings, a table per target, the chart, then the grid of base | adapted per prompt."""
    settings = "".join(
        f"<tr><td>{_e(name)}</td><td class='text'>{_e(value)}</td></tr>" for name, value in evaluation.settings.items()
    )
    tables = "".join(_summary_table(target) for target in evaluation.targets)
    parts = [
        "<!DOCTYPE html>",
        "<html lang='en'><head><meta charset='utf-8'><title>sur-cache evaluate</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>sur-cache evaluate: does the adapter help?</h1>",
        f"<p>CLIP score (100 &times; cosine) of each image against its prompt; difference = adapted &minus; base "
        f"per prompt (mean over its seeds), a win when it is positive; intervals: {CONFIDENCE:.0%} bootstrap over "
        "prompts.</p>",
        tables,
        f"<p><img src='{CHART_FILE}' alt='bar chart: base vs adapted per category'></p>",
        _grid(evaluation),
        f"<h2>Settings</h2><table>{settings}</table>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _summary_table(target: TargetResults) -> str:
    header = "".join(
        f"<th>{name}</th>"
        for name in ("category", "prompts", "base", "adapted", "difference", f"{CONFIDENCE:.0%} interval", "win rate")
    )
    rows = "".join(_summary_row(summary, "") for summary in target.categories)
    rows += _summary_row(target.overall, " class='overall'")
    return f"<h2>Against the {target.target} prompt</h2><table><tr>{header}</tr>{rows}</table>"


def _summary_row(summary: GroupSummary, attributes: str) -> str:
    low, high = summary.difference_interval
    cells = [
        _e(summary.group),
        str(summary.prompts),
        f"{summary.base_mean:.2f}",
        f"{summary.adapted_mean:.2f}",
        f"<span class='{_sign(summary.difference)}'>{summary.difference:+.2f}</span>",
        f"[{low:+.2f}, {high:+.2f}]",
        f"{summary.win_rate:.0%} ({summary.wins}/{summary.prompts})",
    ]
    return f"<tr{attributes}>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>"


def _grid(evaluation: Evaluation) -> str:
    """Each prompt's images, base | adapted per seed, the prompts sorted by |difference| against the simple prompt."""
    simple = evaluation.targets[0]
    by_prompt: dict[int, list[ScoredImage]] = {}
    for image in evaluation.images:
        by_prompt.setdefault(image.prompt, []).append(image)
    rows = []
    for result in sorted(simple.prompts, key=lambda r: (-abs(r.difference), r.index)):
        prompt = evaluation.prompts[result.index]
        figures = "".join(_figure(image) for image in by_prompt[result.index])
        complex_line = f"<br><small>complex: {_e(prompt.complex)}</small>" if prompt.complex else ""
        rows.append(
            f"<tr><td class='text'>{_e(prompt.text)}{complex_line}<br><small>{_e(_category(prompt))}</small></td>"
            f"<td class='{_sign(result.difference)}'>{result.difference:+.2f}</td><td>{figures}</td></tr>"
        )
    header = "<tr><th>prompt</th><th>difference</th><th>base | adapted, per seed</th></tr>"
    return f"<h2>Every prompt, biggest differences first</h2><table>{header}{''.join(rows)}</table>"


def _figure(image: ScoredImage) -> str:
    score = image.scores[TARGETS[0]]
    caption = f"seed {image.seed} {image.variant}<br>{score:.2f}"
    alt = f"seed {image.seed}, {image.variant}"
    picture = f"<img class='sample' src='{_e(image.file)}' alt='{_e(alt)}'>"
    return f"<figure>{picture}<figcaption>{caption}</figcaption></figure>"


def _sign(difference: float) -> str:
    return "win" if difference > 0 else "loss" if difference < 0 else ""


def _e(value) -> str:
    return html.escape(str(value), quote=True)
