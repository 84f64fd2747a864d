"""Stage four: does the adapter help? Base and adapted images of the same prompts and seeds, CLIP-scored, reported.

Reads as setup -> generate and score -> report:

- **setup** reads the prompts (the bundled set unless `--prompts`), refuses an `--out` whose report files or
  images are already there (unless `--overwrite`), then loads the adapter (its checks run before any model is
  built), the stock Stable Diffusion pipeline and the CLIP model that scores.
- **generate and score**: for each prompt, `generate` (the same function `sur-cache generate` uses) draws every
  seed once without and once with the adapter, from one pipeline with the same seeds and settings, so a pair
  differs only by the adapter. Each image is saved and scored against the simple prompt and, where the prompts
  file has one, the complex prompt (`sur_cache.scoring`). A progress bar counts images per second.
- **report**: per prompt, category and overall, the paired statistics of `sur_cache.scoring`; the files of
  `sur_cache.report`.

Raises ValueError for a bad prompts file, an existing output, a bad adapter (corrupt, non-finite, another CLIP
width) or a non-finite score; OSError for a CLIP model that cannot be loaded.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from tqdm.auto import tqdm

from sur_cache import __version__
from sur_cache.adapter import SURAdapter, resolve_attention
from sur_cache.config import DEFAULT_CLIP, EvaluateConfig  # noqa: F401 - the stage's config, torch-free
from sur_cache.devices import AUTO, resolve_device, resolve_dtype
from sur_cache.eval_prompts import EvalPrompt, read_eval_prompts
from sur_cache.models import DTYPES
from sur_cache.report import (
    IMAGES_FOLDER,
    REPORT_FILES,
    TARGETS,
    Evaluation,
    ScoredImage,
    TargetResults,
    image_file,
    write_report,
)
from sur_cache.scoring import VARIANTS, ClipScorer, PromptResult, summarise, summarise_by_category
from sur_cache.stages.generate import drawing_settings, fit_to_pipeline, generate, load_pipeline

UNCATEGORISED = "uncategorised"


def run_evaluate(config: EvaluateConfig) -> Evaluation:
    """Generate, score and report (see the module docstring); returns the evaluation written to `config.out`."""
    prompts = tuple(read_eval_prompts(config.prompts_path))
    refuse_existing_outputs(config, planned_files(config, len(prompts)))
    pipe, adapter = _load_models(config)
    scorer = ClipScorer.from_pretrained(config.clip, device=pipe.device)
    images = generate_and_score(config, prompts, pipe, adapter, scorer)
    evaluation = Evaluation(prompts, images, _target_results(prompts, images), _settings(config, pipe))
    write_report(config.out, evaluation)
    return evaluation


def planned_files(config: EvaluateConfig, num_prompts: int) -> list[Path]:
    """Every file this run writes under `config.out`: the report files and one image per prompt, seed and variant."""
    images = [image_file(p, seed, v) for p in range(num_prompts) for seed in config.seeds for v in VARIANTS]
    return [config.out / name for name in (*REPORT_FILES, *images)]


def refuse_existing_outputs(config: EvaluateConfig, files: list[Path]) -> None:
    """Never replace a file that is already there (an earlier report, or the user's own) unless --overwrite."""
    if config.out.exists() and not config.out.is_dir():
        raise ValueError(f"--out {config.out} is a file; evaluate writes a report folder: choose a folder for --out")
    existing = [str(path) for path in files if path.exists()]
    if existing and not config.overwrite:
        listing = ", ".join(existing[:3]) + (f" and {len(existing) - 3} more" if len(existing) > 3 else "")
        raise ValueError(
            f"--out {config.out}: {len(existing)} of the files this run writes already exist ({listing}); "
            "pass --overwrite to replace them, or choose a new --out"
        )


def _load_models(config: EvaluateConfig):
    """The adapter (checked first, as generate does: a bad adapter costs no model loading) and the pipeline."""
    device = resolve_device(config.device)
    adapter = SURAdapter.from_pretrained(config.adapter, attention=resolve_attention(AUTO, device))
    pipe = load_pipeline(config.sd, device=device, dtype=DTYPES[resolve_dtype(config.dtype, device)])
    return pipe, fit_to_pipeline(adapter, config.adapter, pipe)


def generate_and_score(
    config: EvaluateConfig, prompts: tuple[EvalPrompt, ...], pipe, adapter: SURAdapter, scorer: ClipScorer
) -> tuple[ScoredImage, ...]:
    """Each prompt's base and adapted image for every seed, saved under `config.out` and scored."""
    settings = dict(seeds=config.seeds, **drawing_settings(config))
    (config.out / IMAGES_FOLDER).mkdir(parents=True, exist_ok=True)
    scored = []
    total = len(prompts) * len(config.seeds) * len(VARIANTS)
    with tqdm(total=total, unit="image", desc="evaluate", disable=not config.progress, dynamic_ncols=True) as bar:
        for index, prompt in enumerate(prompts):
            drawn = {}
            for variant, used in zip(VARIANTS, (None, adapter), strict=True):
                drawn[variant] = generate(pipe, used, prompt.text, **settings)
                bar.update(len(config.seeds))
            scored += _score_prompt(config, index, prompt, drawn, scorer)
    return tuple(scored)


def _score_prompt(config: EvaluateConfig, index: int, prompt: EvalPrompt, drawn: dict, scorer: ClipScorer):
    """Save one prompt's images and score them all in one CLIP forward, against its simple and complex prompt."""
    texts = [prompt.text] + ([prompt.complex] if prompt.complex else [])
    keys = [(variant, seed) for variant in VARIANTS for seed in config.seeds]
    pictures = [image for variant in VARIANTS for image in drawn[variant]]
    scores = scorer.scores(pictures, texts)
    scored = []
    for (variant, seed), picture, row in zip(keys, pictures, scores, strict=True):
        file = image_file(index, seed, variant)
        picture.save(config.out / file)
        scored.append(
            ScoredImage(index, seed, variant, file, dict(zip(TARGETS[: len(texts)], map(float, row), strict=True)))
        )
    return scored


def _target_results(prompts: tuple[EvalPrompt, ...], images: tuple[ScoredImage, ...]) -> tuple[TargetResults, ...]:
    """The paired statistics against each target some prompt has (the complex prompt: only prompts that have one)."""
    results = []
    for target in TARGETS:
        per_prompt = tuple(
            _prompt_result(index, prompt, [image for image in images if image.prompt == index], target)
            for index, prompt in enumerate(prompts)
            if target == TARGETS[0] or prompt.complex
        )
        if per_prompt:
            categories = tuple(summarise_by_category(per_prompt))
            results.append(TargetResults(target, per_prompt, categories, summarise("all", per_prompt)))
    return tuple(results)


def _prompt_result(index: int, prompt: EvalPrompt, images: list[ScoredImage], target: str) -> PromptResult:
    by_variant = {variant: [] for variant in VARIANTS}
    for image in sorted(images, key=lambda image: image.seed):
        by_variant[image.variant].append(image.scores[target])
    base, adapted = (tuple(by_variant[variant]) for variant in VARIANTS)
    return PromptResult(index, prompt.category or UNCATEGORISED, base, adapted)


def _settings(config: EvaluateConfig, pipe) -> dict:
    """What made these numbers: every option, the device and dtype it ran on, the prompts file's sha256."""
    path = config.prompts_path
    return {
        "sur_cache_version": __version__,
        "out": str(config.out),
        "sd": config.sd,
        "adapter": str(config.adapter),
        "clip": config.clip,
        "prompts": str(path) if config.prompts is not None else "bundled: sur_cache/data/eval_prompts.jsonl",
        "prompts_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "seeds": list(config.seeds),
        "steps": config.steps,
        "guidance": config.guidance,
        "negative_prompt": config.negative_prompt,
        "height": config.height,
        "width": config.width,
        "device": str(pipe.device),
        "dtype": str(pipe.unet.dtype).removeprefix("torch."),
    }
