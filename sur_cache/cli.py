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
