"""The `sur-cache` command line: each command turns its options into one frozen config and calls its stage."""

from __future__ import annotations

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
    """
