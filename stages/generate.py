"""Stage three: images from short prompts with a trained adapter, through the stock diffusers pipeline.

No forked pipeline: `StableDiffusionPipeline` gets `prompt_embeds` = adapter(CLIP(prompt)) and
`negative_prompt_embeds` = CLIP(negative prompt), both encoded with the pipeline's own tokenizer and text encoder by
`models.encode_clip`, the function that cached the adapter's training inputs (CLIP `last_hidden_state`, 77 tokens).

An adapter in reference-compat mode is applied the way the reference release applies it: to the concatenated
`[negative, positive]` pair in one forward, so that its batch-attending transformer (DESIGN.md section 3) sees the
same two-row batch, and the negative embedding comes out adapted too. Otherwise only the positive prompt is adapted.

SDXL goes through the stock `StableDiffusionXLPipeline` the same way: `prompt_embeds` = adapter(both encoders'
states, `models.encode_clip_sdxl`), `pooled_prompt_embeds` the prompt's own pooled embedding (not adapted, as in
training), and their negatives; an empty negative prompt is zeros, as the pipeline's `force_zeros_for_empty_prompt`
makes it.

Each image's starting noise comes from a CPU generator seeded with its seed, so an image depends on its prompt, seed
and settings only, and the two halves of a `--compare` image start from the same noise.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from sur_cache.adapter import SURAdapter, resolve_attention
from sur_cache.config import GenerateConfig
from sur_cache.devices import resolve_device, resolve_dtype
from sur_cache.models import DTYPES, TextEncoders, encode_prompts, sd_kind, sd_model_facts

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
COMPARE_LABELS = ("base", "with adapter")
INDEX_FILE = "index.jsonl"


@dataclass(frozen=True)
class PlannedImage:
    """One output file: which prompt and seed it shows, and where it goes."""

    prompt: str
    seed: int
    path: Path


def seeds_from_options(seeds: tuple[int, ...], num_seeds: int | None) -> tuple[int, ...]:
    """The `--seed` values, or `--num-seeds` consecutive seeds from the one `--seed` given (or the default's first)."""
    if num_seeds is None:
        return seeds or GenerateConfig.seeds
    if len(seeds) > 1:
        raise ValueError(
            f"--num-seeds {num_seeds} counts up from one --seed, but {len(seeds)} were given; "
            "pass several --seed or --num-seeds, not both"
        )
    start = seeds[0] if seeds else GenerateConfig.seeds[0]
    return tuple(range(start, start + num_seeds))


def read_prompts_file(path: Path) -> list[str]:
    """One prompt per line; blank lines are skipped. The file must be UTF-8 (a ValueError names the first bad line)."""
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ValueError(
            f"--prompts-file {path}: line {line} is not UTF-8 ({error.reason} at byte {error.start}, "
            f"{data[error.start : error.start + 1]!r}); prompts files are read as UTF-8: save the file as UTF-8 "
            "(e.g. `iconv -f latin1 -t utf-8`)."
        ) from error
    return [line.strip() for line in text.splitlines() if line.strip()]


def load_pipeline(sd: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """The stock `StableDiffusionPipeline` or `StableDiffusionXLPipeline` (by the model's family, `models.sd_kind`)
    from a hub id or folder, on `device`, progress bar off."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    pipeline_class = StableDiffusionXLPipeline if sd_kind(sd) == "sdxl" else StableDiffusionPipeline
    pipe = pipeline_class.from_pretrained(sd, torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_adapter(folder: Path, pipe, attention: str = "auto") -> SURAdapter:
    """Load a trained adapter for `pipe` (float32, eval mode, on the pipeline's device); refuse a width mismatch.

    `attention` picks the calibration backend (`auto`: the fused kernel on CUDA, eager elsewhere).
    `SURAdapter.from_pretrained` refuses a corrupt, mismatched or non-finite adapter folder.
    """
    adapter = SURAdapter.from_pretrained(folder, attention=resolve_attention(attention, pipe.device))
    return fit_to_pipeline(adapter, folder, pipe)


def check_adapter_fits(adapter: SURAdapter, folder: Path, clip_width: int) -> None:
    """Refuse an adapter trained on CLIP embeddings of another width than the model's text encoder gives."""
    if adapter.config.width != clip_width:
        raise ValueError(
            f"--adapter {folder}: the adapter was trained on CLIP embeddings of width {adapter.config.width}, but "
            f"the pipeline's text encoder has width {clip_width}. Use the Stable Diffusion model whose features "
            "trained this adapter (--sd), or train an adapter on features extracted with this one."
        )


def fit_to_pipeline(adapter: SURAdapter, folder: Path, pipe) -> SURAdapter:
    """`adapter` (loaded from `folder`) in float32 eval mode on the pipeline's device, if its width fits."""
    encoders = pipeline_text_encoders(pipe).encoders
    check_adapter_fits(adapter, folder, sum(encoder.config.hidden_size for encoder in encoders))
    return adapter.to(device=pipe.device, dtype=torch.float32).eval()


def pipeline_text_encoders(pipe) -> TextEncoders:
    """The pipeline's own tokenizers and text encoders (two for SDXL)."""
    if getattr(pipe, "text_encoder_2", None) is not None:
        return TextEncoders("sdxl", (pipe.tokenizer, pipe.tokenizer_2), (pipe.text_encoder, pipe.text_encoder_2))
    return TextEncoders("sd", (pipe.tokenizer,), (pipe.text_encoder,))


@dataclass(frozen=True)
class PromptEmbeddings:
    """The pipeline's embedding arguments for one prompt, each `[1, ...]` in the pipeline's dtype; the pooled pair
    is None for SD 1.x/2.x."""

    positive: torch.Tensor
    negative: torch.Tensor
    pooled: torch.Tensor | None = None
    negative_pooled: torch.Tensor | None = None

    def pipeline_arguments(self) -> dict[str, torch.Tensor]:
        arguments = {"prompt_embeds": self.positive, "negative_prompt_embeds": self.negative}
        if self.pooled is not None:
            arguments.update(pooled_prompt_embeds=self.pooled, negative_pooled_prompt_embeds=self.negative_pooled)
        return arguments


@torch.inference_mode()
def prompt_embeddings(pipe, adapter: SURAdapter | None, prompt: str, negative_prompt: str = "") -> PromptEmbeddings:
    """The embeddings `pipe` draws `prompt` with: `[1, 77, d]` each, plus `[1, p]` pooled ones for SDXL.

    With `adapter=None` these are the plain CLIP embeddings, the same the pipeline computes from text.
    """
    features = encode_prompts(pipeline_text_encoders(pipe), [negative_prompt, prompt])
    clip = features.embeddings.to(device=pipe.device, dtype=torch.float32)
    if features.pooled is not None and not negative_prompt and pipe.config.force_zeros_for_empty_prompt:
        clip[:1] = 0  # what StableDiffusionXLPipeline does with no negative prompt
        features.pooled[:1] = 0
    if adapter is None:
        negative, positive = clip[:1], clip[1:]
    elif adapter.config.reference_compat:
        adapted = adapter(clip).embedding  # the reference adapts [negative, positive] as one batch
        negative, positive = adapted[:1], adapted[1:]
    else:
        negative, positive = clip[:1], adapter(clip[1:]).embedding
    dtype = pipe.unet.dtype
    if features.pooled is None:
        return PromptEmbeddings(positive.to(dtype), negative.to(dtype))
    pooled = features.pooled.to(device=pipe.device, dtype=dtype)
    return PromptEmbeddings(positive.to(dtype), negative.to(dtype), pooled[1:], pooled[:1])


def generate(
    pipe,
    adapter: SURAdapter | None,
    prompt: str,
    *,
    seeds: Sequence[int] = (0,),
    negative_prompt: str = "",
    steps: int = 50,
    guidance: float = 7.5,
    height: int | None = None,
    width: int | None = None,
) -> list[Image.Image]:
    """One image per seed for `prompt`, with the adapter (or without it, `adapter=None`)."""
    embeddings = prompt_embeddings(pipe, adapter, prompt, negative_prompt)
    result = pipe(
        **embeddings.pipeline_arguments(),
        num_images_per_prompt=len(seeds),
        generator=[torch.Generator("cpu").manual_seed(seed) for seed in seeds],
        num_inference_steps=steps,
        guidance_scale=guidance,
        height=height,
        width=width,
    )
    return result.images


def side_by_side(left: Image.Image, right: Image.Image, labels: tuple[str, str] = COMPARE_LABELS) -> Image.Image:
    """`left | right` under a white band that names each half (PIL's default font)."""
    font = ImageFont.load_default()
    band = font.getbbox("Ag")[3] + 6
    canvas = Image.new("RGB", (left.width + right.width, band + max(left.height, right.height)), "white")
    draw = ImageDraw.Draw(canvas)
    for x, image, label in ((0, left, labels[0]), (left.width, right, labels[1])):
        canvas.paste(image.convert("RGB"), (x, band))
        draw.text((x + 3, 3), label, fill="black", font=font)
    return canvas


def plan_outputs(prompts: Sequence[str], seeds: Sequence[int], out: Path, compare: bool = False) -> list[PlannedImage]:
    """Where each (prompt, seed) image goes: `out` itself for a single image named like a file, else a folder."""
    count = len(prompts) * len(seeds)
    if out.suffix.lower() in IMAGE_SUFFIXES:
        if count > 1:
            raise ValueError(
                f"--out {out} names one image file, but this run writes {count} images ({len(prompts)} prompt(s) "
                f"x {len(seeds)} seed(s)). Pass a folder as --out."
            )
        return [PlannedImage(prompts[0], seeds[0], out)]
    kind = "compare" if compare else "image"
    return [
        PlannedImage(prompt, seed, out / f"{index:03d}-{_slug(prompt)}-seed{seed}-{kind}.png")
        for index, prompt in enumerate(prompts)
        for seed in seeds
    ]


def drawing_settings(config) -> dict:
    """What a generate or evaluate config says about drawing an image, as `generate`'s keyword arguments."""
    return dict(
        negative_prompt=config.negative_prompt,
        steps=config.steps,
        guidance=config.guidance,
        height=config.height,
        width=config.width,
    )


def run_generate(config: GenerateConfig) -> list[PlannedImage]:
    """Load the pipeline and adapter, write one image (or one comparison) per prompt and seed, and say where.

    Returns the written images. Raises ValueError for an `--out` that cannot hold the images, an adapter folder
    that is corrupt, mismatched or not finite (checked before the pipeline is built), or an adapter whose width
    does not match the pipeline's text encoder.
    """
    _refuse_undecodable_prompts(config)
    planned = plan_outputs(config.prompts, config.seeds, config.out, config.compare)
    if not config.overwrite:
        _refuse_existing_outputs(config, planned)
    device = resolve_device(config.device)
    adapter = SURAdapter.from_pretrained(config.adapter, attention=resolve_attention(config.attention, device))
    check_adapter_fits(adapter, config.adapter, sd_model_facts(config.sd).clip_width)  # before the pipeline loads
    pipe = load_pipeline(config.sd, device=device, dtype=DTYPES[resolve_dtype(config.dtype, device)])
    adapter = fit_to_pipeline(adapter, config.adapter, pipe)
    settings = drawing_settings(config)
    per_prompt = len(config.seeds)
    for index, prompt in enumerate(config.prompts):
        outputs = planned[index * per_prompt : (index + 1) * per_prompt]
        images = generate(pipe, adapter, prompt, seeds=config.seeds, **settings)
        if config.compare:
            base = generate(pipe, None, prompt, seeds=config.seeds, **settings)
            images = [side_by_side(b, a) for b, a in zip(base, images, strict=True)]
        for output, image in zip(outputs, images, strict=True):
            output.path.parent.mkdir(parents=True, exist_ok=True)
            image.save(output.path)
            print(f"{output.path}  (seed {output.seed}: {prompt!r})")
    if _index_path(config, planned) is not None:
        _write_index(config, planned)
    return planned


def _refuse_undecodable_prompts(config: GenerateConfig) -> None:
    """A prompt from the command line holds raw bytes (a lone surrogate) when the shell's encoding is not UTF-8."""
    named = [("--prompt", prompt) for prompt in config.prompts] + [("--negative-prompt", config.negative_prompt)]
    for option, text in named:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            raise ValueError(
                f"{option} {text!r} is not UTF-8 text (bytes the shell could not decode, at character {error.start}); "
                "pass the prompt in UTF-8 (set a UTF-8 locale, e.g. LANG=C.UTF-8) or put it in a UTF-8 --prompts-file."
            ) from error


def _index_path(config: GenerateConfig, planned: list[PlannedImage]) -> Path | None:
    return config.out / INDEX_FILE if len(planned) > 1 else None


def _refuse_existing_outputs(config: GenerateConfig, planned: list[PlannedImage]) -> None:
    """Never replace a file that is already there (an earlier run's image, or the user's own) unless --overwrite."""
    paths = [p.path for p in planned] + [path for path in [_index_path(config, planned)] if path is not None]
    existing = [str(path) for path in paths if path.exists()]
    if existing:
        listing = ", ".join(existing[:3]) + (f" and {len(existing) - 3} more" if len(existing) > 3 else "")
        raise ValueError(
            f"--out {config.out}: {len(existing)} of the files this run writes already exist ({listing}); "
            "pass --overwrite to replace them, or choose a new --out"
        )


def _write_index(config: GenerateConfig, planned: list[PlannedImage]) -> None:
    """`index.jsonl` beside the images: file name, prompt, seed and settings of each, since names are shortened."""
    rows = [
        {
            "file_name": p.path.name,
            "prompt": p.prompt,
            "seed": p.seed,
            "negative_prompt": config.negative_prompt,
            "steps": config.steps,
            "guidance": config.guidance,
            "compare": config.compare,
        }
        for p in planned
    ]
    path = _index_path(config, planned)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    print(f"{path}  (prompt and seed of each image)")


def _slug(prompt: str, max_length: int = 40) -> str:
    """A file-name-safe, shortened form of a prompt."""
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:max_length].rstrip("-") or "prompt"
