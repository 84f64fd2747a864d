"""The `sur-cache` command line: each command turns its options into one frozen config and calls its stage."""

from __future__ import annotations

from pathlib import Path

import click

from sur_cache import __version__

# What a user's input can cause: a bad option or file (ValueError and its store/manifest/checkpoint subclasses) or an
# unreadable path or model (OSError). Turned into one `Error: ...` message and exit code 1 in one place, below;
# anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError)


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
    train             feature store -> trained adapter (the frozen encoders are never loaded)
    generate          images from short prompts with a trained adapter
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
    default=5120,
    help="Width of the LLM features the adapter will be trained or evaluated with (LLaMA-13B: 5120).",
)
@click.option(
    "--llm-proj-seed",
    type=int,
    default=0,
    help="Seed of the fresh LLM projection (the reference never saved its own); recorded in config.json.",
)
@click.option("--num-heads", type=int, default=8, help="Attention heads of the reference encoder (not in the weights).")
@click.option("--overwrite", is_flag=True, help="Write into --out even if it is not empty.")
def import_reference_command(checkpoint, adapter_weight, out, llm_width, llm_proj_seed, num_heads, overwrite) -> None:
    """Import a reference SUR-adapter checkpoint into a sur-cache adapter folder (reference-compat mode).

    The result reproduces the reference forward exactly, including its batch-mixing transformer (identical to
    per-token processing at batch 1). Its LLM projection is freshly initialised from --llm-proj-seed.
    """
    from sur_cache.adapter import import_reference
    from sur_cache.config import ImportReferenceConfig

    config = ImportReferenceConfig(
        checkpoint=checkpoint,
        out=out,
        adapter_weight=adapter_weight,
        llm_width=llm_width,
        llm_proj_seed=llm_proj_seed,
        num_heads=num_heads,
        overwrite=overwrite,
    )
    click.echo(f"wrote {import_reference(config)}")


@main.command("generate")
@click.option(
    "--sd",
    required=True,
    help="Stable Diffusion model: a diffusers folder or hub id (the one the adapter was trained on).",
)
@click.option(
    "--adapter",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Adapter folder written by `sur-cache train` or `sur-cache import-reference`.",
)
@click.option("--prompt", "prompts", multiple=True, help="A prompt (repeatable).")
@click.option(
    "--prompts-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A text file with one prompt per line (added after the --prompt ones).",
)
@click.option(
    "--negative-prompt",
    default="",
    help="Negative prompt (its CLIP embedding is not adapted, except in reference-compat mode).",
)
@click.option("--steps", type=int, default=50, help="Denoising steps.")
@click.option("--guidance", type=float, default=7.5, help="Classifier-free guidance scale (<= 1 turns guidance off).")
@click.option("--seed", "seeds", type=int, multiple=True, help="Seed of the starting noise (repeatable)  [default: 0]")
@click.option("--num-seeds", type=int, help="Use this many consecutive seeds, from the --seed given (or 0).")
@click.option("--height", type=int, help="Image height in pixels, a multiple of 8  [default: the model's]")
@click.option("--width", type=int, help="Image width in pixels, a multiple of 8  [default: the model's]")
@click.option("--device", default="auto", help="Torch device: auto (CUDA if available), cpu, cuda, cuda:1, ...")
@click.option(
    "--dtype",
    type=click.Choice(["auto", "float32", "float16", "bfloat16"]),
    default="auto",
    help="Pipeline precision (auto: float16 on CUDA, float32 on the CPU); the adapter runs in float32.",
)
@click.option(
    "--attention",
    type=click.Choice(["auto", "eager", "sdpa", "fused"]),
    default="auto",
    help="Adapter attention-calibration backend (auto: the fused Triton kernel on CUDA, eager elsewhere).",
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
def generate_command(
    sd,
    adapter,
    prompts,
    prompts_file,
    negative_prompt,
    steps,
    guidance,
    seeds,
    num_seeds,
    height,
    width,
    device,
    dtype,
    attention,
    compare,
    overwrite,
    out,
) -> None:
    """Generate images from prompts with the stock diffusers StableDiffusionPipeline and a trained adapter.

    The prompt's CLIP embedding goes through the adapter and into the pipeline as prompt_embeds; each image's
    starting noise is seeded by its seed, so --compare halves differ only by the adapter.
    """
    from sur_cache.config import GenerateConfig
    from sur_cache.stages.generate import read_prompts_file, run_generate

    all_prompts = tuple(prompts) + tuple(read_prompts_file(prompts_file) if prompts_file else ())
    config = GenerateConfig(
        sd=sd,
        adapter=adapter,
        prompts=all_prompts,
        out=out,
        negative_prompt=negative_prompt,
        steps=steps,
        guidance=guidance,
        seeds=_seeds(seeds, num_seeds),
        height=height,
        width=width,
        device=device,
        dtype=dtype,
        attention=attention,
        compare=compare,
        overwrite=overwrite,
    )
    run_generate(config)


def _seeds(seeds: tuple[int, ...], num_seeds: int | None) -> tuple[int, ...]:
    """The --seed values, or --num-seeds consecutive seeds from the one --seed given (default 0)."""
    if num_seeds is None:
        return seeds or (0,)
    if len(seeds) > 1:
        raise click.UsageError("--num-seeds counts up from one --seed; pass several --seed or --num-seeds, not both.")
    start = seeds[0] if seeds else 0
    return tuple(range(start, start + num_seeds))


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
    "--sd", required=True, help="Stable Diffusion folder or hub id (tokenizer/, text_encoder/, vae/ are used)."
)
@click.option("--llm", default=None, help="LLM teacher: hub id, local folder, or alias llama-7b/llama-13b/llama-30b.")
@click.option(
    "--llm-features",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Instead of --llm: a reference {simple prompt: tensor[D]} .pt file (e.g. prompt2vec/13B/39.pt).",
)
@click.option("--resolution", type=int, default=512, help="Image side in pixels after resize + crop.")
@click.option("--batch-size", type=int, default=16, help="Samples per CLIP and VAE call.")
@click.option(
    "--llm-batch-size",
    type=int,
    default=64,
    help="Prompts per LLM call (bitsandbytes' int8 matmul is far more efficient on larger batches).",
)
@click.option(
    "--device", default="auto", help="cpu, cuda, cuda:1, ... ('auto': this process's accelerator or the CPU)."
)
@click.option(
    "--sd-dtype",
    type=click.Choice(["auto", "float16", "bfloat16", "float32"]),
    default="auto",
    help="CLIP and VAE weights dtype ('auto': float16 on CUDA, float32 on the CPU).",
)
@click.option(
    "--llm-layer",
    type=int,
    default=-1,
    help="Decoder layer whose raw output is the LLM feature (0-based; negative counts from the end).",
)
@click.option(
    "--llm-pooling",
    type=click.Choice(["mean", "last"]),
    default="mean",
    help="Pool the layer's states over the prompt's real tokens (mean) or take the last real token.",
)
@click.option(
    "--llm-per-token", is_flag=True, help="Also store the per-token states padded to 77 (llm_tokens, llm_mask)."
)
@click.option("--llm-8bit/--no-8bit", default=True, help="Load the LLM in 8-bit (bitsandbytes LLM.int8).")
@click.option(
    "--llm-dtype",
    type=click.Choice(["float16", "bfloat16", "float32"]),
    default="float16",
    help="LLM dtype (of the non-quantised parts with --llm-8bit; of all weights with --no-8bit).",
)
@click.option(
    "--llm-alongside",
    is_flag=True,
    help="Keep CLIP, VAE and LLM in memory together for one pass (default: LLM after CLIP/VAE are freed).",
)
@click.option("--trust-remote-code", is_flag=True, help="Allow the LLM's repository to run its own model code.")
@click.option(
    "--crop",
    type=click.Choice(["center", "random"]),
    default="center",
    help="Square crop after resizing the shorter side; random crops are seeded per sample.",
)
@click.option("--seed", type=int, default=0, help="Seed of the random crops (with the sample's metadata line).")
@click.option("--flip-variants", is_flag=True, help="Also store the latent distribution of the mirrored image.")
@click.option(
    "--store-dtype", type=click.Choice(["float16", "float32"]), default="float16", help="Dtype of the stored features."
)
@click.option("--shard-rows", type=int, default=256, help="Samples per shard file (the unit of writing and resuming).")
@click.option(
    "--chunk-rows",
    type=int,
    default=16,
    help="Samples per checksummed chunk inside a shard (1 for the fastest single random-sample reads).",
)
@click.option(
    "--compression",
    type=click.Choice(["none", "zstd", "blosc"]),
    default="none",
    help="Chunk compression; fp16 features barely compress (zstd saves about 8%, at half the read speed).",
)
@click.option(
    "--num-workers",
    type=int,
    default=None,
    help="Image-decoding DataLoader workers per process (default: the free cores, at most 8).",
)
@click.option("--text-column", default="text", help="metadata.jsonl key of the simple prompt.")
@click.option("--prompt-column", default="prompt", help="metadata.jsonl key of the complex prompt.")
@click.option("--image-column", default="file_name", help="metadata.jsonl key of the image file name.")
@click.option("--strict", is_flag=True, help="Fail on the first bad row instead of skipping and reporting it.")
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace the sur-cache store at --out instead of resuming it (only the store's own files are removed).",
)
@click.option("--progress/--no-progress", default=True, help="Show a progress bar with samples/s.")
def extract_command(**options) -> None:
    """Run the frozen CLIP, VAE and LLM once over a SURD dataset and write a feature store.

    Re-running the same command resumes: finished shards are kept, unfinished ones recomputed. Run it under
    `torchrun` or `accelerate launch` to split the shards between processes.
    """
    from accelerate import PartialState

    from sur_cache.config import ExtractConfig
    from sur_cache.stages.extract import format_summary, run_extract

    summary = run_extract(ExtractConfig(**options))
    if PartialState().is_main_process:
        click.echo(format_summary(summary))


@main.command("inspect")
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (complete, skipped, manifest, arrays).")
def inspect_command(store: str, as_json: bool) -> None:
    """Show a feature store: manifest, arrays (shape, dtype, chunks, shards), completion, skipped rows, bytes."""
    import json

    from sur_cache.store import FIELD_SHA256, FeatureStore

    description = FeatureStore.open(store).describe()
    if as_json:
        click.echo(json.dumps(description, indent=2))
        return
    manifest = dict(description["manifest"])
    file_names = manifest.pop("file_names", [])
    manifest.pop(FIELD_SHA256, None)  # a checksum per field, verified on open; --json shows them
    click.echo(f"store     {description['url']}")
    click.echo(
        f"samples   {description['num_samples']}: {description['complete']} complete, {description['pending']} pending"
    )
    skipped = ", ".join(f"{reason} {n}" for reason, n in description["skipped"].items()) or "none"
    click.echo(f"skipped   {sum(description['skipped'].values())} ({skipped})")
    click.echo(f"on disk   {description['bytes_stored'] / 2**20:.2f} MiB")
    click.echo("manifest")
    for key, value in manifest.items():
        click.echo(f"  {key:<22} {json.dumps(value)}")
    click.echo(f"  {'file_names':<22} [{len(file_names)} names]")
    click.echo("arrays")
    for name, array in description["arrays"].items():
        click.echo(
            f"  {name:<22} {str(tuple(array['shape'])):<18} {array['dtype']:<8} chunks {tuple(array['chunks'])} "
            f"shards {tuple(array['shards'])} {array['bytes_stored'] / 2**20:.2f} MiB"
        )


@main.command("verify")
@click.argument("store")
def verify_command(store: str) -> None:
    """Read every chunk of a feature store back: crc32c checksums, missing shard files (status included), NaN or inf
    in complete samples; exit code 1 if anything is wrong."""
    from sur_cache.store import FeatureStore

    opened = FeatureStore.open(store)
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


@main.command("demo-assets")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder to write into.")
@click.option("--num-samples", type=int, default=32, help="Images in the demo dataset.")
@click.option(
    "--llm",
    type=click.Choice(["auto", "minilm", "tiny"]),
    default="auto",
    help="LLM teacher: the packaged all-MiniLM-L6-v2 (demo extra), a tiny random Llama, or auto (MiniLM if installed).",
)
def demo_assets_command(out, num_samples, llm) -> None:
    """Build the demo's inputs: a SURD-format dataset, a tiny random Stable Diffusion, and an LLM teacher folder."""
    from sur_cache.demo import build_demo_assets

    assets = build_demo_assets(out, num_samples=num_samples, llm=llm)
    click.echo(f"dataset   {assets.data}  ({num_samples} images, metadata.jsonl)")
    click.echo(f"sd        {assets.sd}  (tiny random Stable Diffusion)")
    click.echo(f"llm       {assets.llm}  ({assets.llm_kind})")


@main.command("train")
@click.option("--store", required=True, help="Feature store written by `sur-cache extract` (opened read-only).")
@click.option("--sd", required=True, help="The Stable Diffusion folder or hub id the store was extracted with.")
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Run folder, new or empty or an earlier run's: adapter/, checkpoints/, train_log.jsonl, loss.png, run.json.",
)
@click.option("--batch-size", type=int, default=1, help="Samples per micro-batch per process (reference: 1).")
@click.option("--gradient-accumulation", type=int, default=4, help="Micro-batches per optimizer step (reference: 4).")
@click.option(
    "--max-steps",
    type=int,
    default=None,
    help="Optimizer steps to run  [default: 5000 (the reference) unless --epochs]",
)
@click.option(
    "--epochs", type=int, default=None, help="Passes over the store (with --max-steps: whichever ends first)."
)
@click.option(
    "--random-flip", is_flag=True, help="Use the flipped latents with probability 0.5 (needs a --flip-variants store)."
)
@click.option(
    "--buffer-shards", type=int, default=4, help="Shards shuffled together; each is read whole, in one range read."
)
@click.option(
    "--read-workers",
    type=int,
    default=1,
    help="Reader processes streaming shards ahead of the training loop (0: read in the loop itself).",
)
@click.option(
    "--preload",
    type=click.Choice(["none", "cpu", "device"]),
    default="none",
    help="Read the whole store into CPU or GPU memory first (fastest for --denoise-weight 0).",
)
@click.option("--online", is_flag=True, help="Recompute every feature from --data with stage one's code (no cache).")
@click.option(
    "--data",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="With --online: the dataset folder the store was extracted from.",
)
@click.option("--llm", default=None, help="With --online: the LLM teacher  [default: the one in the store's manifest]")
@click.option("--adapter-weight", type=float, default=0.1, help="w in w * adapter(x) + (1 - w) * x (reference: 0.1).")
@click.option("--num-layers", type=int, default=2, help="Transformer encoder layers of the adapter.")
@click.option("--num-heads", type=int, default=8, help="Attention heads of the adapter's encoder.")
@click.option("--feedforward", type=int, default=2048, help="Feed-forward width of the adapter's encoder.")
@click.option("--dropout", type=float, default=0.1, help="Dropout of the adapter's encoder.")
@click.option(
    "--attention",
    type=click.Choice(["auto", "eager", "sdpa", "fused"]),
    default="auto",
    help="Attention-calibration backend (auto: the fused Triton kernel on CUDA, eager on the CPU).",
)
@click.option(
    "--reference-compat",
    is_flag=True,
    help="Reproduce the reference encoder layout (attention across the batch, not the tokens).",
)
@click.option(
    "--freeze-llm-proj", is_flag=True, help="Keep the LLM projection at its seeded initialisation (the reference)."
)
@click.option(
    "--denoise-weight", type=float, default=1.0, help="Weight of the UNet's MSE; 0 skips the UNet (features-only)."
)
@click.option("--llm-weight", type=float, default=1e-5, help="Weight of the LLM distillation KL (reference: 1e-5).")
@click.option("--align-weight", type=float, default=1e-5, help="Weight of the complex-prompt alignment KL (1e-5).")
@click.option(
    "--detach-unet-input",
    is_flag=True,
    help="Detach the adapter output before the UNet, as the reference script does (only the KL terms then train).",
)
@click.option("--snr-gamma", type=float, default=None, help="Min-SNR-gamma loss weighting (e.g. 5.0); off by default.")
@click.option("--lr", type=float, default=1e-5, help="AdamW learning rate (reference: 1e-5).")
@click.option(
    "--lr-schedule",
    type=click.Choice(["constant", "cosine", "linear"]),
    default="constant",
    help="Learning-rate schedule after the warmup (reference: constant).",
)
@click.option("--warmup-steps", type=int, default=0, help="Linear warmup steps of the learning rate.")
@click.option(
    "--weight-decay", type=float, default=1e-2, help="AdamW weight decay (torch's default, as the reference)."
)
@click.option("--max-grad-norm", type=float, default=1.0, help="Gradient-norm clipping (reference: 1.0).")
@click.option(
    "--mixed-precision",
    type=click.Choice(["no", "fp16", "bf16"]),
    default="no",
    help="Autocast precision; the frozen UNet is stored in it too (reference: fp16; bf16 recommended on GPUs).",
)
@click.option("--seed", type=int, default=0, help="Seed of the data order, the noise, dropout and the LLM projection.")
@click.option("--checkpoint-every", type=int, default=500, help="Write a checkpoint folder every N optimizer steps.")
@click.option(
    "--resume",
    default=None,
    help="Continue from a checkpoint folder, or 'latest' (the newest under OUT/checkpoints); a setting that changes "
    "the run's meaning must match the checkpoint's (docs/train.md lists what may change).",
)
@click.option("--cpu", is_flag=True, help="Train on the CPU even if a GPU is available.")
def train_command(**options) -> None:
    """Train a SUR-adapter from a feature store; only the frozen UNet is loaded (no LLM, CLIP or VAE).

    Run it under `torchrun` or `accelerate launch` for several GPUs: each process reads a disjoint part of the
    store. One optimizer step consumes batch-size x gradient-accumulation x processes samples.
    """
    from sur_cache.config import TrainConfig
    from sur_cache.stages.train import run_train

    final = run_train(TrainConfig(**options))
    click.echo(f"adapter   {final}")
