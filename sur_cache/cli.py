"""The `sur-cache` command line: each command turns its options into one frozen config and calls its stage."""

from __future__ import annotations

import inspect
from pathlib import Path

import click

from sur_cache import __version__
from sur_cache.adapter_config import ATTENTION_CHOICES
from sur_cache.choices import (
    AUTO,
    COMPILE_CHOICES,
    COMPRESSIONS,
    DEFAULT_RESOLUTION,
    DEVICE_HELP,
    DTYPE_CHOICES,
    LLM_BATCH_SIZE_CAP,
    LLM_BATCH_SIZE_CPU,
)
from sur_cache.config import (
    CROP_MODES,
    LLM_DTYPES,
    LLM_POOLINGS,
    LR_SCHEDULES,
    MIXED_PRECISION,
    PRELOAD,
    REFERENCE_MAX_STEPS,
    STORE_DTYPES,
    EvaluateConfig,
    ExtractConfig,
    GenerateConfig,
    ImportReferenceConfig,
    TrainConfig,
)
from sur_cache.demo import LLM_CHOICES as DEMO_LLM_CHOICES
from sur_cache.demo import build_demo_assets
from sur_cache.locations import StorageOptions

# Every default below is read from the config dataclass (or function) the option feeds, and every choice list from
# the module that owns it, so that changing one is a one-line edit there (tests/test_cli.py checks they agree).
ATTENTION_HELP = "Adapter attention-calibration backend (auto: the fused Triton kernel on CUDA, eager elsewhere)."

# What a user's input can cause: a bad option or file (ValueError and its store/manifest/checkpoint subclasses) or an
# unreadable path or model (OSError). Turned into one `Error: ...` message and exit code 1 in one place, below;
# anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError)


def _default(function, name: str):
    """A keyword default of `function`: an option of a command without a config dataclass shares it this way."""
    return inspect.signature(function).parameters[name].default


def _storage_option(command):
    """`--storage-option KEY=VALUE` (repeatable) of every command that opens a store; the command parses it with
    `StorageOptions.parse` into its config (or call), whose values are never printed."""
    return click.option(
        "--storage-option",
        multiple=True,
        metavar="KEY=VALUE",
        help="An fsspec storage option of the store URL, repeatable: for s3:// e.g. endpoint_url=http://HOST:PORT, "
        'key=..., secret=..., client_kwargs=\'{"region_name": "eu-west-1"}\' (JSON), anon=true. Or set '
        "botocore's environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY). Values are never "
        "printed or recorded.",
    )(command)


class _AutoOrCount(click.ParamType):
    """A count >= 1, or `auto` (None: the stage picks it)."""

    name = "auto|N"

    def convert(self, value, param, ctx):
        if value is None or value == AUTO:
            return None
        if isinstance(value, int) or str(value).strip().removeprefix("-").isdigit():
            return int(value)  # a count below 1 is refused by the config, with the others
        self.fail(f"expected {AUTO} or a whole number, got {value!r}", param, ctx)


_AUTO_OR_COUNT = _AutoOrCount()


class _Commands(click.Group):
    """The command group; its `invoke` is the one place where a user-facing error becomes a CLI message."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except USER_ERRORS as error:
            raise click.ClickException(str(error)) from error


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="sur-cache")
def main() -> None:
    """Cache a frozen Stable Diffusion model's features once, then train SUR-adapters from the cache.

    \b
    extract           dataset -> Zarr feature store (LLM, CLIP, VAE run once)
    inspect, verify   read a store's manifest and check its checksums
    migrate           convert a store of sur-cache 0.1.0 (schema 1) to this release's format
    train             feature store -> trained adapter (the frozen encoders are never loaded)
    generate          images from short prompts with a trained adapter
    evaluate          CLIP scores with and without the adapter, per category, in an HTML report
    import-reference  a reference adapter_checkpoint*.pt -> a sur-cache adapter folder
    demo-assets       the demo's dataset, tiny diffusion models and LLM teacher (make demo)
    """


@main.command("import-reference")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--adapter-weight",
    type=float,
    required=True,
    help="Adapter weight w of the run that wrote the checkpoint (not stored in it): 0.1 in the reference run, "
    "0.01 the reference default.",
)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Adapter folder to write.")
@click.option(
    "--llm-width",
    type=int,
    default=ImportReferenceConfig.llm_width,
    help="Width of the LLM features the adapter will be trained or evaluated with (LLaMA-13B: 5120).",
)
@click.option(
    "--llm-proj-seed",
    type=int,
    default=ImportReferenceConfig.llm_proj_seed,
    help="Seed of the fresh LLM projection (the reference never saved its own); recorded in config.json.",
)
@click.option(
    "--num-heads",
    type=int,
    default=ImportReferenceConfig.num_heads,
    help="Attention heads of the reference encoder (not in the weights).",
)
@click.option("--overwrite", is_flag=True, help="Write into --out even if it is not empty.")
def import_reference_command(**options) -> None:
    """Import a reference SUR-adapter checkpoint into a sur-cache adapter folder (reference-compat mode).

    The result reproduces the reference forward exactly, including its batch-mixing transformer (identical to
    per-token processing at batch 1). Its LLM projection is freshly initialised from --llm-proj-seed.
    """
    from sur_cache.stages.import_reference import run_import_reference

    click.echo(f"wrote {run_import_reference(ImportReferenceConfig(**options))}")


def _pipeline_options(config: type, runs_in_float32: str):
    """The options of every command that draws images with the SD pipeline and an adapter (generate, evaluate),
    each default read from that command's config; `runs_in_float32` completes the --dtype help."""
    options = [
        click.option(
            "--sd", required=True, help="Stable Diffusion folder or hub id (the one the adapter was trained on)."
        ),
        click.option(
            "--adapter",
            required=True,
            type=click.Path(exists=True, file_okay=False, path_type=Path),
            help="Adapter folder written by `sur-cache train` or `sur-cache import-reference`.",
        ),
        click.option(
            "--negative-prompt",
            default=config.negative_prompt,
            help="Negative prompt (its CLIP embedding is not adapted, except in reference-compat mode).",
        ),
        click.option("--steps", type=int, default=config.steps, help="Denoising steps."),
        click.option(
            "--guidance",
            type=float,
            default=config.guidance,
            help="Classifier-free guidance scale (<= 1 turns guidance off).",
        ),
        click.option(
            "--height",
            type=int,
            default=config.height,
            help="Image height in pixels, a multiple of 8  [default: the model's]",
        ),
        click.option(
            "--width",
            type=int,
            default=config.width,
            help="Image width in pixels, a multiple of 8  [default: the model's]",
        ),
        click.option("--device", default=config.device, help=DEVICE_HELP),
        click.option(
            "--dtype",
            type=click.Choice(DTYPE_CHOICES),
            default=config.dtype,
            help=f"Pipeline precision (auto: float16 on CUDA, float32 elsewhere); {runs_in_float32}.",
        ),
    ]

    def apply(command):
        for option in reversed(options):  # click lists options in decorator order, top first
            command = option(command)
        return command

    return apply


@main.command("generate")
@_pipeline_options(GenerateConfig, "the adapter runs in float32")
@click.option("--prompt", "prompts", multiple=True, help="A prompt (repeatable).")
@click.option(
    "--prompts-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A text file with one prompt per line (added after the --prompt ones).",
)
@click.option(
    "--seed",
    type=int,
    multiple=True,
    help=f"Seed of the starting noise (repeatable)  [default: {', '.join(map(str, GenerateConfig.seeds))}]",
)
@click.option("--num-seeds", type=int, help="Use this many consecutive seeds, from the --seed given (or the default).")
@click.option(
    "--attention", type=click.Choice(ATTENTION_CHOICES), default=GenerateConfig.attention, help=ATTENTION_HELP
)
@click.option("--compare", is_flag=True, help="Write base | with-adapter side by side, from the same seed, labelled.")
@click.option(
    "--overwrite", is_flag=True, help="Replace images (and index.jsonl) already at --out; without it they are refused."
)
@click.option(
    "--out",
    required=True,
    type=click.Path(path_type=Path),
    help="An image file (.png/.jpg/.webp) for one image; a folder for several (with an index.jsonl).",
)
def generate_command(prompts, prompts_file, seed, num_seeds, **options) -> None:
    """Generate images from prompts with the stock diffusers StableDiffusionPipeline and a trained adapter.

    The prompt's CLIP embedding goes through the adapter and into the pipeline as prompt_embeds; each image's
    starting noise is seeded by its seed, so --compare halves differ only by the adapter.
    """
    from sur_cache.stages.generate import read_prompts_file, run_generate, seeds_from_options

    all_prompts = tuple(prompts) + tuple(read_prompts_file(prompts_file) if prompts_file else ())
    run_generate(GenerateConfig(prompts=all_prompts, seeds=seeds_from_options(seed, num_seeds), **options))


@main.command("evaluate")
@_pipeline_options(EvaluateConfig, "the adapter and CLIP run in float32")
@click.option(
    "--clip",
    default=EvaluateConfig.clip,
    help="CLIP model that scores the images: a hub id or a folder with a CLIPModel and its CLIPProcessor.",
)
@click.option(
    "--prompts",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=EvaluateConfig.prompts,
    help="A .jsonl file with SURD columns text, prompt (optional), category (optional), or a text file of one "
    "prompt a line  [default: the bundled 60 prompts in counting, colour and action]",
)
@click.option("--seed", type=int, default=EvaluateConfig.seed, help="First seed of the starting noise.")
@click.option("--num-seeds", type=int, default=EvaluateConfig.num_seeds, help="Seeds per prompt, from --seed up.")
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace the report files and images already at --out; without it they are refused (nothing else is touched).",
)
@click.option("--progress/--no-progress", default=EvaluateConfig.progress, help="Show a progress bar with images/s.")
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Report folder: report.html, chart.png, metrics.json, scores.csv and images/.",
)
def evaluate_command(**options) -> None:
    """Score base and adapted images of the same prompts and seeds with CLIP, and write a report.

    For each prompt and seed, one pipeline draws the image without and with the adapter from the same noise and
    settings; both are scored against the simple prompt (and the complex one, where the prompts file has it).
    Per category and overall: mean scores, the mean difference with a 95% bootstrap interval, the win rate.
    """
    from sur_cache.report import format_summary
    from sur_cache.stages.evaluate import run_evaluate

    click.echo(format_summary(run_evaluate(EvaluateConfig(**options))))


# ----------------------------------------------------------------------------------- extract, inspect, verify


@main.command("extract")
@click.option(
    "--data",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    required=True,
    help="SURD dataset folder: images plus metadata.jsonl.",
)
@click.option(
    "--out",
    required=True,
    help="Feature store to write or resume: a folder or a file:// or fsspec URL (s3://... with the s3 extra).",
)
@click.option(
    "--sd",
    required=True,
    help="Stable Diffusion 1.x/2.x or SDXL folder or hub id (its family is read from model_index.json; the "
    "tokenizers, text encoders and vae/ are used).",
)
@click.option(
    "--llm",
    default=ExtractConfig.llm,
    help="LLM teacher: hub id, local folder, or an alias (llama-13b, llama3-8b, qwen2.5-7b, ...: docs/models.md).",
)
@click.option(
    "--llm-features",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=ExtractConfig.llm_features,
    help="Instead of --llm: a reference {simple prompt: tensor[D]} .pt file (e.g. prompt2vec/13B/39.pt).",
)
@click.option(
    "--resolution",
    type=int,
    default=ExtractConfig.resolution,
    help="Image side in pixels after resize + crop [default: "
    + ", ".join(f"{size} for {kind}" for kind, size in DEFAULT_RESOLUTION.items())
    + "].",
)
@click.option("--batch-size", type=int, default=ExtractConfig.batch_size, help="Samples per CLIP and VAE call.")
@click.option(
    "--llm-batch-size",
    type=_AUTO_OR_COUNT,
    default=ExtractConfig.llm_batch_size,
    help=f"Prompts per LLM call, or auto [default]: on a GPU the largest power of two up to {LLM_BATCH_SIZE_CAP} "
    f"that fits its free memory (docs/store.md), on the CPU {LLM_BATCH_SIZE_CPU}. The store records the one used "
    "(bitsandbytes' int8 matmul is far more efficient on larger batches); a resume uses the recorded one.",
)
@click.option("--device", default=ExtractConfig.device, help=DEVICE_HELP)
@click.option(
    "--sd-dtype",
    type=click.Choice(DTYPE_CHOICES),
    default=ExtractConfig.sd_dtype,
    help="CLIP and VAE weights dtype (auto: float16 on CUDA, float32 elsewhere).",
)
@click.option(
    "--vae-dtype",
    type=click.Choice(DTYPE_CHOICES),
    default=ExtractConfig.vae_dtype,
    help="VAE dtype (auto: float32 for an SDXL VAE whose config asks to be upcast, since it overflows in float16; "
    "else --sd-dtype).",
)
@click.option(
    "--llm-layer",
    type=int,
    default=ExtractConfig.llm_layer,
    help="Decoder layer whose raw output is the LLM feature (0-based; negative counts from the end).",
)
@click.option(
    "--llm-layers",
    default=ExtractConfig.llm_layers,
    help="Instead of --llm-layer: several layers (20,30,39) or all, stored as llm [N, layers, D]; "
    "train --llm-layer picks the teacher from them.",
)
@click.option(
    "--llm-pooling",
    type=click.Choice(LLM_POOLINGS),
    default=ExtractConfig.llm_pooling,
    help="Pool the layer's states over the prompt's real tokens (mean) or take the last real token.",
)
@click.option(
    "--llm-per-token", is_flag=True, help="Also store the per-token states padded to 77 (llm_tokens, llm_mask)."
)
@click.option(
    "--llm-chat-template",
    is_flag=True,
    help="Encode each prompt as a user message through the tokenizer's chat template (default: the raw prompt).",
)
@click.option(
    "--llm-8bit/--no-8bit", default=ExtractConfig.llm_8bit, help="Load the LLM in 8-bit (bitsandbytes LLM.int8)."
)
@click.option(
    "--llm-dtype",
    type=click.Choice(LLM_DTYPES),
    default=ExtractConfig.llm_dtype,
    help="LLM dtype (of the non-quantised parts with --llm-8bit; of all weights with --no-8bit).",
)
@click.option(
    "--overlap/--no-overlap",
    default=ExtractConfig.overlap,
    help="Load CLIP, the VAE and the LLM together and run the image pass (decoding, CLIP, VAE) and the LLM pass of "
    "the same shards concurrently, each in its own thread and CUDA stream; --no-overlap runs the LLM after CLIP "
    "and the VAE are freed (less memory). The store is byte-identical either way. [default: on a GPU when all "
    "three fit its free memory (docs/store.md), off on the CPU]",
)
@click.option("--trust-remote-code", is_flag=True, help="Allow the LLM's repository to run its own model code.")
@click.option(
    "--crop",
    type=click.Choice(CROP_MODES),
    default=ExtractConfig.crop,
    help="Square crop after resizing the shorter side; random crops are seeded per sample.",
)
@click.option(
    "--seed",
    type=int,
    default=ExtractConfig.seed,
    help="Seed of the random crops (with the sample's metadata line).",
)
@click.option("--flip-variants", is_flag=True, help="Also store the latent distribution of the mirrored image.")
@click.option(
    "--store-dtype",
    type=click.Choice(STORE_DTYPES),
    default=ExtractConfig.store_dtype,
    help="Dtype of the stored features.",
)
@click.option(
    "--shard-rows",
    type=int,
    default=ExtractConfig.shard_rows,
    help="Samples per shard file (the unit of writing and resuming).",
)
@click.option(
    "--chunk-rows",
    type=int,
    default=ExtractConfig.chunk_rows,
    help="Samples per checksummed chunk inside a shard (1 for the fastest single random-sample reads).",
)
@click.option(
    "--compression",
    type=click.Choice(COMPRESSIONS),
    default=ExtractConfig.compression,
    help="Chunk compression; fp16 features barely compress (zstd saves about 8%, at half the read speed).",
)
@click.option(
    "--num-workers",
    type=int,
    default=ExtractConfig.num_workers,
    help="Image-decoding DataLoader workers per process (default: the free cores, at most 8).",
)
@click.option("--text-column", default=ExtractConfig.text_column, help="metadata.jsonl key of the simple prompt.")
@click.option("--prompt-column", default=ExtractConfig.prompt_column, help="metadata.jsonl key of the complex prompt.")
@click.option("--image-column", default=ExtractConfig.image_column, help="metadata.jsonl key of the image file name.")
@click.option("--strict", is_flag=True, help="Fail on the first bad row instead of skipping and reporting it.")
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace the sur-cache store at --out instead of resuming it (only the store's own files are removed).",
)
@click.option("--progress/--no-progress", default=ExtractConfig.progress, help="Show a progress bar with samples/s.")
@_storage_option
def extract_command(storage_option, **options) -> None:
    """Run the frozen CLIP, VAE and LLM once over a SURD dataset and write a feature store.

    Re-running the same command resumes: finished shards are kept, unfinished ones recomputed. Run it under
    `torchrun` or `accelerate launch` to split the shards between processes.
    """
    from accelerate import PartialState

    from sur_cache.stages.extract import format_summary, run_extract

    summary = run_extract(ExtractConfig(storage_options=StorageOptions.parse(storage_option), **options))
    if PartialState().is_main_process:
        click.echo(format_summary(summary))


@main.command("inspect")
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (complete, skipped, manifest, arrays).")
@_storage_option
def inspect_command(store: str, as_json: bool, storage_option: tuple[str, ...]) -> None:
    """Show a feature store: manifest, arrays (shape, dtype, chunks, shards), completion, skipped rows, bytes."""
    import json

    from sur_cache.stages.inspect import format_description
    from sur_cache.store import FeatureStore

    description = FeatureStore.open(store, storage_options=StorageOptions.parse(storage_option)).describe()
    click.echo(json.dumps(description, indent=2) if as_json else format_description(description))


@main.command("verify")
@click.argument("store")
@_storage_option
def verify_command(store: str, storage_option: tuple[str, ...]) -> None:
    """Read every chunk of a feature store back: crc32c checksums, missing shard files (status included), NaN or inf
    in complete samples; exit code 1 if anything is wrong."""
    from sur_cache.store import FeatureStore

    opened = FeatureStore.open(store, storage_options=StorageOptions.parse(storage_option))
    corrupt = opened.verify()
    for bad in corrupt:
        click.echo(f"corrupt   {bad.array} samples {bad.start}..{bad.stop - 1}: {bad.error}", err=True)
    checked = len(opened.array_names)
    if corrupt:
        click.echo(
            f"{len(corrupt)} corrupt ranges in {checked} arrays of {store}; "
            "re-extract with `sur-cache extract ... --overwrite`",
            err=True,
        )
        raise SystemExit(1)
    click.echo(
        f"ok: {checked} arrays, {opened.num_samples} samples, every chunk's checksum matches, "
        "every complete sample is finite"
    )


@main.command("migrate")
@click.argument("store")
@_storage_option
def migrate_command(store: str, storage_option: tuple[str, ...]) -> None:
    """Convert a feature store written by sur-cache 0.1.0 (schema 1) in place to this release's schema.

    Crash-safe: the new arrays and commit markers are written first and the store's zarr.json last, atomically, so
    a migration that stops can be run again. Feature data is never rewritten.
    """
    from sur_cache.migration import migrate
    from sur_cache.store import SCHEMA_VERSION

    converted = migrate(store, StorageOptions.parse(storage_option))
    click.echo(f"{store}: {'migrated to' if converted else 'already'} schema {SCHEMA_VERSION}")


@main.command("demo-assets")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder to write into.")
@click.option(
    "--num-samples", type=int, default=_default(build_demo_assets, "num_samples"), help="Images in the demo dataset."
)
@click.option(
    "--llm",
    type=click.Choice(DEMO_LLM_CHOICES),
    default=_default(build_demo_assets, "llm"),
    help="LLM teacher: the packaged all-MiniLM-L6-v2 (demo extra), a tiny random Llama, or auto (MiniLM if installed).",
)
def demo_assets_command(out, num_samples, llm) -> None:
    """Build the demo's inputs: a SURD-format dataset, a tiny random Stable Diffusion, and an LLM teacher folder."""
    assets = build_demo_assets(out, num_samples=num_samples, llm=llm)
    click.echo(f"dataset   {assets.data}  ({num_samples} images, metadata.jsonl)")
    click.echo(f"sd        {assets.sd}  (tiny random Stable Diffusion)")
    click.echo(f"llm       {assets.llm}  ({assets.llm_kind})")
    click.echo(f"clip      {assets.clip}  (tiny random CLIP, scores images in evaluate)")
    click.echo(f"prompts   {assets.eval_prompts}  (a few evaluation prompts per category)")


@main.command("train")
@click.option("--store", required=True, help="Feature store written by `sur-cache extract` (opened read-only).")
@click.option("--sd", required=True, help="The Stable Diffusion folder or hub id the store was extracted with.")
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Run folder, new or empty or an earlier run's: adapter/, checkpoints/, train_log.jsonl, loss.png, run.json.",
)
@click.option(
    "--batch-size", type=int, default=TrainConfig.batch_size, help="Samples per micro-batch per process (reference: 1)."
)
@click.option(
    "--gradient-accumulation",
    type=int,
    default=TrainConfig.gradient_accumulation,
    help="Micro-batches per optimizer step (reference: 4).",
)
@click.option(
    "--max-steps",
    type=int,
    default=TrainConfig.max_steps,
    help=f"Optimizer steps to run  [default: {REFERENCE_MAX_STEPS} (the reference) unless --epochs]",
)
@click.option(
    "--epochs",
    type=int,
    default=TrainConfig.epochs,
    help="Passes over the store (with --max-steps: whichever ends first).",
)
@click.option(
    "--random-flip", is_flag=True, help="Use the flipped latents with probability 0.5 (needs a --flip-variants store)."
)
@click.option(
    "--buffer-shards",
    type=int,
    default=TrainConfig.buffer_shards,
    help="Shards shuffled together; each is read whole, in one range read.",
)
@click.option(
    "--read-workers",
    type=int,
    default=TrainConfig.read_workers,
    help="Reader processes streaming shards ahead of the training loop (0: read in the loop itself), for stores "
    "that are not read through maps (--mapped-reads).",
)
@click.option(
    "--mapped-reads/--no-mapped-reads",
    default=TrainConfig.mapped_reads,
    help="Gather batches straight from the memory-mapped shard files where the store allows it (local, "
    "uncompressed: one copy from the page cache, each chunk's checksum checked once); --no-mapped-reads uses the "
    "--read-workers reader processes, which read ahead of the loop (a cold page cache, a network filesystem).",
)
@click.option(
    "--preload",
    type=click.Choice(PRELOAD),
    default=TrainConfig.preload,
    help="Read the whole store into CPU or GPU memory first (fastest for --denoise-weight 0).",
)
@click.option("--online", is_flag=True, help="Recompute every feature from --data with stage one's code (no cache).")
@click.option(
    "--data",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=TrainConfig.data,
    help="With --online: the dataset folder the store was extracted from.",
)
@click.option(
    "--llm", default=TrainConfig.llm, help="With --online: the LLM teacher  [default: the one in the store's manifest]"
)
@click.option(
    "--llm-layer",
    default=TrainConfig.llm_layer,
    help="Teacher: a stored LLM layer's number, mean (of the stored layers) or norm-mean (of RMS-normalised "
    "layers)  [default: the store's layer; the last one of a multi-layer store]",
)
@click.option(
    "--adapter-weight",
    type=float,
    default=TrainConfig.adapter_weight,
    help="w in w * adapter(x) + (1 - w) * x (reference: 0.1).",
)
@click.option(
    "--num-layers", type=int, default=TrainConfig.num_layers, help="Transformer encoder layers of the adapter."
)
@click.option("--num-heads", type=int, default=TrainConfig.num_heads, help="Attention heads of the adapter's encoder.")
@click.option(
    "--feedforward", type=int, default=TrainConfig.feedforward, help="Feed-forward width of the adapter's encoder."
)
@click.option("--dropout", type=float, default=TrainConfig.dropout, help="Dropout of the adapter's encoder.")
@click.option("--attention", type=click.Choice(ATTENTION_CHOICES), default=TrainConfig.attention, help=ATTENTION_HELP)
@click.option(
    "--reference-compat",
    is_flag=True,
    help="Reproduce the reference encoder layout (attention across the batch, not the tokens).",
)
@click.option(
    "--freeze-llm-proj", is_flag=True, help="Keep the LLM projection at its seeded initialisation (the reference)."
)
@click.option(
    "--denoise-weight",
    type=float,
    default=TrainConfig.denoise_weight,
    help="Weight of the UNet's MSE; 0 skips the UNet (features-only).",
)
@click.option(
    "--llm-weight",
    type=float,
    default=TrainConfig.llm_weight,
    help="Weight of the LLM distillation KL (reference: 1e-5).",
)
@click.option(
    "--align-weight",
    type=float,
    default=TrainConfig.align_weight,
    help="Weight of the complex-prompt alignment KL (1e-5).",
)
@click.option(
    "--detach-unet-input",
    is_flag=True,
    help="Detach the adapter output before the UNet, as the reference script does (only the KL terms then train).",
)
@click.option(
    "--snr-gamma",
    type=float,
    default=TrainConfig.snr_gamma,
    help="Min-SNR-gamma loss weighting (e.g. 5.0); off by default.",
)
@click.option("--lr", type=float, default=TrainConfig.lr, help="AdamW learning rate (reference: 1e-5).")
@click.option(
    "--lr-schedule",
    type=click.Choice(LR_SCHEDULES),
    default=TrainConfig.lr_schedule,
    help="Learning-rate schedule after the warmup (reference: constant).",
)
@click.option(
    "--warmup-steps", type=int, default=TrainConfig.warmup_steps, help="Linear warmup steps of the learning rate."
)
@click.option(
    "--weight-decay",
    type=float,
    default=TrainConfig.weight_decay,
    help="AdamW weight decay (torch's default, as the reference).",
)
@click.option(
    "--max-grad-norm", type=float, default=TrainConfig.max_grad_norm, help="Gradient-norm clipping (reference: 1.0)."
)
@click.option(
    "--mixed-precision",
    type=click.Choice(MIXED_PRECISION),
    default=TrainConfig.mixed_precision,
    help="Autocast precision; the frozen UNet is stored in it too (reference: fp16; bf16 recommended on GPUs).",
)
@click.option(
    "--compile",
    type=click.Choice(COMPILE_CHOICES),
    default=TrainConfig.compile,
    help="torch.compile the adapter with its losses: none, default (inductor), reduce-overhead (inductor replayed "
    "from CUDA graphs), max-autotune (slow to compile); auto: reduce-overhead on CUDA, none on the CPU. Full batches "
    "only (an epoch's last partial batch is dropped), so shapes are static and it compiles once.",
)
@click.option(
    "--seed",
    type=int,
    default=TrainConfig.seed,
    help="Seed of the data order, the noise, dropout and the LLM projection.",
)
@click.option(
    "--checkpoint-every",
    type=int,
    default=TrainConfig.checkpoint_every,
    help="Write a checkpoint folder every N optimizer steps.",
)
@click.option(
    "--val-fraction",
    type=float,
    default=TrainConfig.val_fraction,
    help="Hold out this share of the store's shards (whole shards, seeded, at least one) that training never "
    "reads, and validate on them (0: no validation).",
)
@click.option(
    "--val-every",
    type=int,
    default=TrainConfig.val_every,
    help="Validate every N optimizer steps and at the end (needs --val-fraction)  [default: --checkpoint-every]",
)
@click.option(
    "--resume",
    default=TrainConfig.resume,
    help="Continue from a checkpoint folder, or 'latest' (the newest under OUT/checkpoints); a setting that changes "
    "the run's meaning must match the checkpoint's (docs/train.md lists what may change).",
)
@click.option("--device", default=TrainConfig.device, help=DEVICE_HELP)
@_storage_option
def train_command(storage_option, **options) -> None:
    """Train a SUR-adapter from a feature store; only the frozen UNet is loaded (no LLM, CLIP or VAE).

    Run it under `torchrun` or `accelerate launch` for several GPUs: each process reads a disjoint part of the
    store. One optimizer step consumes batch-size x gradient-accumulation x processes samples.
    """
    from sur_cache.stages.train import run_train

    final = run_train(TrainConfig(storage_options=StorageOptions.parse(storage_option), **options))
    click.echo(f"adapter   {final}")
