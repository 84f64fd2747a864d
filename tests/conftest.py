"""Shared fixtures: tiny models saved to a temp folder once per session, a small SURD-format dataset, and stores of
random features."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from sur_cache.demo_data import build_demo_dataset  # noqa: E402
from sur_cache.store import DONE, FeatureStore, synthetic_store  # noqa: E402
from sur_cache.tiny_models import TINY_CLIP_WIDTH, build_sdxl_pipeline, build_tiny_models  # noqa: E402

RANDOM_STORE_SHAPES = dict(clip_width=TINY_CLIP_WIDTH, llm_width=6, latent_channels=4, latent_size=2)


@pytest.fixture
def random_store():
    """Makes a read-only store of complete samples with random features (and flipped latents) at tiny widths:
    `random_store(path, num_samples, shard_rows, chunk_rows)`; clip arrays hold several chunks a shard."""

    def make(path, num_samples: int, shard_rows: int, chunk_rows: int) -> FeatureStore:
        store = synthetic_store(
            path,
            num_samples=num_samples,
            shard_rows=shard_rows,
            chunk_rows=chunk_rows,
            flip_variants=True,
            **RANDOM_STORE_SHAPES,
        )
        rng = np.random.default_rng(0)
        for shard, (start, stop) in enumerate(store.shard_ranges()):
            rows = {
                name: rng.standard_normal((stop - start, *spec.row_shape)).astype(spec.dtype)
                for name, spec in store.specs.items()
                if name != "status"
            }
            store.write_shard(shard, rows, np.full(stop - start, DONE, np.uint8))
        return FeatureStore.open(path, mode="r")

    return make


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """`TinyModels(sd=..., llm=...)`: folders loadable with the real `from_pretrained` paths."""
    return build_tiny_models(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    """The folder of a tiny StableDiffusionXLPipeline, loadable with the real `from_pretrained` paths."""
    folder = tmp_path_factory.mktemp("tiny_sdxl") / "sdxl"
    build_sdxl_pipeline(folder)
    return folder


@pytest.fixture(scope="session")
def sdxl_store(tiny_sdxl, tiny_models, demo_dataset, tmp_path_factory):
    """A float32 store of the 12 demo samples from the tiny SDXL (random crops, flipped latents, shards of 4), on
    the CPU so that `--online` recomputes the same numbers. Read-only by convention."""
    from sur_cache.config import ExtractConfig
    from sur_cache.stages.extract import run_extract
    from sur_cache.tiny_models import TINY_RESOLUTION

    out = tmp_path_factory.mktemp("sdxl_store") / "store.zarr"
    config = ExtractConfig(
        data=demo_dataset,
        out=str(out),
        sd=str(tiny_sdxl),
        llm=str(tiny_models.llm),
        resolution=TINY_RESOLUTION,
        batch_size=4,
        shard_rows=4,
        num_workers=0,
        llm_8bit=False,
        llm_dtype="float32",
        store_dtype="float32",
        llm_layer=1,
        crop="random",
        flip_variants=True,
        progress=False,
        device="cpu",
    )
    run_extract(config)
    return out


@pytest.fixture(scope="session")
def demo_dataset(tmp_path_factory):
    """A 12-sample SURD-format folder (read-only by convention: copy it before editing)."""
    return build_demo_dataset(tmp_path_factory.mktemp("surd") / "data", num_samples=12)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One moto S3 server for the session (tests/s3_server.py); each test takes its own bucket."""
    from s3_server import start_server

    process, server = start_server(tmp_path_factory.mktemp("s3_server") / "moto.log")
    yield server
    process.terminate()
    process.wait()
