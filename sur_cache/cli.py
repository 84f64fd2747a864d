"""The `sur-cache` command line: each command turns its options into one frozen config and calls its stage."""

from __future__ import annotations

from pathlib import Path

import click

from sur_cache import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="sur-cache")
def main() -> None:
    """Cache a frozen Stable Diffusion model's features once, then train SUR-adapters from the cache.

    \b
    extract           dataset -> Zarr feature store (LLM, CLIP, VAE run once)
    inspect, verify   read a store's manifest and check its checksums
    train             feature store -> trained adapter (the frozen encoders are never loaded)
    generate          images from short prompts with a trained adapter
    import-reference  a reference adapter_checkpoint*.pt -> a sur-cache adapter folder
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
    from sur_cache.adapter import ReferenceCheckpointError, import_reference
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
    try:
        click.echo(f"wrote {import_reference(config)}")
    except (ReferenceCheckpointError, FileExistsError) as error:
        raise click.ClickException(str(error)) from error


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
    out,
) -> None:
    """Generate images from prompts with the stock diffusers StableDiffusionPipeline and a trained adapter.

    The prompt's CLIP embedding goes through the adapter and into the pipeline as prompt_embeds; each image's
    starting noise is seeded by its seed, so --compare halves differ only by the adapter.
    """
    from sur_cache.config import GenerateConfig
    from sur_cache.stages.generate import read_prompts_file, run_generate

    all_prompts = tuple(prompts) + tuple(read_prompts_file(prompts_file) if prompts_file else ())
    try:
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
        )
        run_generate(config)
    except (ValueError, FileNotFoundError) as error:
        raise click.ClickException(str(error)) from error


def _seeds(seeds: tuple[int, ...], num_seeds: int | None) -> tuple[int, ...]:
    """The --seed values, or --num-seeds consecutive seeds from the one --seed given (default 0)."""
    if num_seeds is None:
        return seeds or (0,)
    if len(seeds) > 1:
        raise click.UsageError("--num-seeds counts up from one --seed; pass several --seed or --num-seeds, not both.")
    start = seeds[0] if seeds else 0
    return tuple(range(start, start + num_seeds))
