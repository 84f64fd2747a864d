"""Stage one on a tiny SDXL: the stored embeddings are what StableDiffusionXLPipeline computes, the time ids what it
builds, and the manifest records the family, its widths, the default resolution and the VAE's dtype."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from sur_cache.config import ExtractConfig
from sur_cache.dataset import ImageDataset, read_metadata
from sur_cache.loader import check_manifest, sdxl_conditioning
from sur_cache.models import DEFAULT_RESOLUTION, encode_vae, load_vae, sd_model_facts
from sur_cache.stages import extract
from sur_cache.store import FeatureStore, ManifestMismatchError
from sur_cache.tiny_models import TINY_RESOLUTION, TINY_SDXL_CLIP_WIDTHS, TINY_SDXL_POOLED_WIDTH


@pytest.fixture(scope="module")
def pipe(tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl))


def _read_all(store: FeatureStore) -> dict[str, np.ndarray]:
    return store.read(store.array_names, 0, store.num_samples)


def test_the_manifest_records_the_family_and_its_widths(sdxl_store):
    manifest = FeatureStore.open(sdxl_store).manifest
    assert manifest.sd_kind == "sdxl" and manifest.pooled_width == TINY_SDXL_POOLED_WIDTH
    assert manifest.clip_width == sum(TINY_SDXL_CLIP_WIDTHS)
    assert manifest.vae_dtype is None and manifest.vae_compute_dtype == "float32"  # the CPU's float32 for both
    store = FeatureStore.open(sdxl_store)
    assert {"pooled_simple", "pooled_complex", "original_size"} <= set(store.array_names)


@torch.no_grad()
def test_stored_embeddings_equal_the_pipelines_encode_prompt(sdxl_store, pipe, demo_dataset):
    store = FeatureStore.open(sdxl_store)
    stored = _read_all(store)
    rows, _ = read_metadata(demo_dataset)
    for column, prompts in (("simple", [r.text for r in rows]), ("complex", [r.prompt for r in rows])):
        for start in range(0, len(rows), 4):  # extract's own batches: bit-equal batched math
            embeds, _, pooled, _ = pipe.encode_prompt(
                prompts[start : start + 4], device="cpu", do_classifier_free_guidance=False
            )
            np.testing.assert_array_equal(stored[f"clip_{column}"][start : start + 4], embeds.numpy())
            np.testing.assert_array_equal(stored[f"pooled_{column}"][start : start + 4], pooled.numpy())


@torch.no_grad()
def test_stored_latents_sizes_and_crops_are_the_images(sdxl_store, tiny_sdxl, demo_dataset):
    store = FeatureStore.open(sdxl_store)
    stored = _read_all(store)
    rows, _ = read_metadata(demo_dataset)
    manifest = store.manifest
    items = [ImageDataset(rows, manifest.resolution, "random", manifest.crop_seed)[i] for i in range(len(rows))]
    from PIL import Image

    sizes = [Image.open(row.path).size[::-1] for row in rows]  # (height, width); the demo images have no EXIF
    np.testing.assert_array_equal(stored["original_size"], np.array(sizes, dtype=np.int32))
    np.testing.assert_array_equal(stored["crop_offset"], np.stack([i["crop_offset"].numpy() for i in items]))
    assert stored["crop_offset"].any(), "the random crops should not all be at (0, 0)"
    vae = load_vae(str(tiny_sdxl))
    latents = encode_vae(vae, torch.stack([item["pixels"] for item in items[:4]]))
    np.testing.assert_array_equal(stored["latent_mean"][:4], latents.mean.numpy())


def test_time_ids_equal_the_pipelines_for_the_stored_size_and_crop(sdxl_store, pipe):
    store = FeatureStore.open(sdxl_store)
    stored = {name: torch.from_numpy(a) for name, a in _read_all(store).items()}
    conditioning = sdxl_conditioning(stored, store.manifest.resolution)
    target = (TINY_RESOLUTION, TINY_RESOLUTION)
    projection = pipe.text_encoder_2.config.projection_dim
    for row in range(store.num_samples):
        original = tuple(stored["original_size"][row].tolist())
        crop = tuple(stored["crop_offset"][row].tolist())
        expected = pipe._get_add_time_ids(original, crop, target, torch.float32, text_encoder_projection_dim=projection)
        torch.testing.assert_close(conditioning["time_ids"][row : row + 1], expected, rtol=0, atol=0)
    torch.testing.assert_close(conditioning["text_embeds"], stored["pooled_simple"])


def test_the_default_resolution_and_vae_dtype_follow_the_family(tiny_sdxl, tiny_models, demo_dataset, tmp_path):
    rows, _ = read_metadata(demo_dataset)
    teacher = extract._Teacher(48, 1)
    cuda = torch.device("cuda")  # only names the dtype `auto` resolves to: nothing runs on it

    def manifest(sd, **options):
        config = ExtractConfig(data=demo_dataset, out=str(tmp_path / "s"), sd=str(sd), llm="x", **options)
        return extract.build_manifest(config, rows, sd_model_facts(str(sd)), teacher, cuda)

    sdxl, sd = manifest(tiny_sdxl), manifest(tiny_models.sd)
    assert sdxl.resolution == DEFAULT_RESOLUTION["sdxl"] == 1024 and sd.resolution == DEFAULT_RESOLUTION["sd"] == 512
    assert sdxl.latent_size == 1024 // 4
    # auto on CUDA: float16 text encoders; the SDXL VAE (force_upcast) in float32, SD's VAE as before
    assert (sdxl.sd_dtype, sdxl.vae_dtype, sdxl.vae_compute_dtype) == ("float16", "float32", "float32")
    assert (sd.sd_kind, sd.pooled_width, sd.vae_dtype, sd.vae_compute_dtype) == ("sd", None, None, "float16")
    assert manifest(tiny_sdxl, vae_dtype="bfloat16").vae_dtype == "bfloat16"
    assert manifest(tiny_sdxl, resolution=64).resolution == 64


def test_a_store_of_one_family_never_feeds_a_model_of_the_other(sdxl_store, tiny_sdxl, tiny_models):
    manifest = FeatureStore.open(sdxl_store).manifest
    check_manifest(manifest, str(tiny_sdxl))
    with pytest.raises(ManifestMismatchError, match="sd_kind: the SD model --sd .* has sd, .* has sdxl"):
        check_manifest(manifest, str(tiny_models.sd))
    sd_manifest = dataclasses.replace(manifest, sd_kind="sd", pooled_width=None, clip_width=32)
    with pytest.raises(ManifestMismatchError, match="sd_kind: the SD model --sd .* has sdxl, .* has sd"):
        check_manifest(sd_manifest, str(tiny_sdxl))


def test_an_unknown_pipeline_class_is_refused_naming_it(tiny_sdxl, tmp_path):
    import json
    import shutil

    sd = tmp_path / "sd3"
    shutil.copytree(tiny_sdxl, sd, ignore=shutil.ignore_patterns("*.safetensors"))
    index = json.loads((sd / "model_index.json").read_text())
    (sd / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusion3Pipeline"}))
    with pytest.raises(ValueError, match="names the pipeline 'StableDiffusion3Pipeline'; sur-cache supports"):
        sd_model_facts(str(sd))
