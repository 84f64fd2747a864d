"""The report folder: the HTML references every image it lists and every file it references exists, relative links
only, escaped prompts, the grid sorted by |difference|; the chart is a PNG; metrics.json and a tidy scores.csv."""

import csv
import json
from html.parser import HTMLParser

from PIL import Image

from sur_cache.eval_prompts import EvalPrompt
from sur_cache.report import (
    CHART_FILE,
    METRICS_FILE,
    REPORT_FILE,
    SCORES_COLUMNS,
    Evaluation,
    ScoredImage,
    TargetResults,
    format_summary,
    image_file,
    write_report,
)
from sur_cache.scoring import PromptResult, summarise, summarise_by_category

PROMPTS = (
    EvalPrompt("two cats <b>nap</b> & dream", "two cats, sleeping, 8k", "counting"),
    EvalPrompt("a red kite", None, "colour"),
    EvalPrompt("a dog runs", "dog running, park", "action"),
)
SEEDS = (0, 1)
# (base, adapted) score against the simple prompt per prompt; the complex score is the simple one minus 5.
SIMPLE = {0: (20.0, 21.0), 1: (20.0, 17.0), 2: (20.0, 20.5)}


def _evaluation(out) -> Evaluation:
    (out / "images").mkdir(parents=True)
    images = []
    for index, prompt in enumerate(PROMPTS):
        for seed in SEEDS:
            for variant, score in zip(("base", "adapted"), SIMPLE[index], strict=True):
                file = image_file(index, seed, variant)
                Image.new("RGB", (16, 16), (index * 60, seed * 80, 0)).save(out / file)
                scores = {"simple": score + seed} | ({"complex": score + seed - 5} if prompt.complex else {})
                images.append(ScoredImage(index, seed, variant, file, scores))
    targets = []
    for target in ("simple", "complex"):
        results = tuple(
            PromptResult(
                index,
                prompt.category,
                tuple(i.scores[target] for i in images if i.prompt == index and i.variant == "base"),
                tuple(i.scores[target] for i in images if i.prompt == index and i.variant == "adapted"),
            )
            for index, prompt in enumerate(PROMPTS)
            if target in images[2 * len(SEEDS) * index].scores
        )
        targets.append(TargetResults(target, results, tuple(summarise_by_category(results)), summarise("all", results)))
    settings = {"out": str(out), "sd": "models/sd", "negative_prompt": "<script>alert(1)</script>"}
    return Evaluation(PROMPTS, tuple(images), tuple(targets), settings)


class _Page(HTMLParser):
    """The image sources, link targets and visible text of a page."""

    def __init__(self):
        super().__init__()
        self.sources, self.links, self.text, self.tags = [], [], [], []

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.tags.append(tag)
        if tag == "img":
            self.sources.append(attributes["src"])
        if "href" in attributes:
            self.links.append(attributes["href"])

    def handle_data(self, data):
        self.text.append(data)


def _page(out) -> _Page:
    page = _Page()
    page.feed((out / REPORT_FILE).read_text(encoding="utf-8"))
    return page


def test_the_html_references_every_image_and_every_referenced_file_exists(tmp_path):
    evaluation = _evaluation(tmp_path)
    assert write_report(tmp_path, evaluation) == tmp_path / REPORT_FILE
    page = _page(tmp_path)
    assert set(page.sources) == {image.file for image in evaluation.images} | {CHART_FILE}
    for reference in page.sources + page.links:
        assert not reference.startswith(("/", "http:", "https:", "file:")), reference  # opens from disk, moved or not
        assert (tmp_path / reference).is_file(), reference
    assert "script" not in page.tags and "link" not in page.tags  # self-contained: no script, no stylesheet file


def test_the_chart_is_a_png(tmp_path):
    write_report(tmp_path, _evaluation(tmp_path))
    with Image.open(tmp_path / CHART_FILE) as chart:
        assert chart.format == "PNG" and chart.width > 200


def test_prompts_and_settings_are_escaped(tmp_path):
    write_report(tmp_path, _evaluation(tmp_path))
    page = _page(tmp_path)
    assert "b" not in page.tags and "script" not in page.tags
    text = "".join(page.text)
    assert "two cats <b>nap</b> & dream" in text and "<script>alert(1)</script>" in text


def test_the_grid_lists_the_biggest_differences_first(tmp_path):
    write_report(tmp_path, _evaluation(tmp_path))
    sources = [source for source in _page(tmp_path).sources if source != CHART_FILE]
    order = list(dict.fromkeys(int(source.split("prompt")[1][:3]) for source in sources))
    assert order == [1, 0, 2]  # differences -3, +1, +0.5: the loss of 3 first


def test_scores_csv_is_tidy_one_row_per_image_and_target(tmp_path):
    evaluation = _evaluation(tmp_path)
    write_report(tmp_path, evaluation)
    with (tmp_path / "scores.csv").open(encoding="utf-8", newline="") as file:
        rows = list(csv.DictReader(file))
    assert tuple(rows[0]) == SCORES_COLUMNS
    assert len(rows) == sum(len(image.scores) for image in evaluation.images) == 20
    first = rows[0]
    assert (first["prompt"], first["category"], first["seed"], first["variant"], first["against"]) == (
        PROMPTS[0].text,
        "counting",
        "0",
        "base",
        "simple",
    )
    assert float(first["score"]) == 20.0 and (tmp_path / first["image"]).is_file()


def test_metrics_json_holds_settings_summaries_and_every_prompt(tmp_path):
    evaluation = _evaluation(tmp_path)
    write_report(tmp_path, evaluation)
    metrics = json.loads((tmp_path / METRICS_FILE).read_text(encoding="utf-8"))
    assert metrics["settings"]["sd"] == "models/sd"
    simple = metrics["targets"]["simple"]
    assert [c["group"] for c in simple["categories"]] == ["counting", "colour", "action"]
    assert simple["overall"]["wins"] == 2 and simple["overall"]["prompts"] == 3
    assert [p["difference"] for p in simple["prompts"]] == [1.0, -3.0, 0.5]
    assert len(metrics["targets"]["complex"]["prompts"]) == 2  # the kite has no complex prompt


def test_the_summary_names_each_target_and_the_report(tmp_path):
    text = format_summary(_evaluation(tmp_path))
    assert "vs simple" in text and "vs complex" in text and "win rate 67% (2/3 prompts)" in text
    assert str(tmp_path / REPORT_FILE) in text
