"""Features computed on the fly from the images, with stage one's own code: `sur-cache train --online`.

The store still names the samples and the settings (its manifest: resolution, crop, LLM layer and pooling, columns,
dtypes); none of its feature arrays is read. Sample i is row i of the dataset's usable rows, as in stage one, so an
online run trains on exactly the batches a cached run would, and comparing the two proves the cache exact.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sur_cache.dataset import ImageDataset, metadata_sha256, read_metadata
from sur_cache.models import DTYPES, encode_llm, encode_prompts, encode_vae, load_llm, load_text_encoders, load_vae
from sur_cache.store import Manifest, names_sha256
from sur_cache.teacher_layers import extracted_layers


class OnlineSource:
    """A `FeatureSource` running the frozen CLIP text encoder(s), VAE and LLM on every batch (for SDXL also the
    pooled embedding, and the original size and crop offset the dataset code measures, as stage one stores them)."""

    def __init__(
        self,
        manifest: Manifest,
        data: Path,
        sd: str,
        *,
        llm: str | None,
        latents: bool,
        device: torch.device,
    ) -> None:
        self.manifest, self.device = manifest, torch.device(device)
        self.rows = _matching_rows(manifest, Path(data))
        sd_dtype = DTYPES[manifest.sd_dtype]
        self.text = load_text_encoders(sd, manifest.sd_kind, device=self.device, dtype=sd_dtype)
        vae_dtype = DTYPES[manifest.vae_compute_dtype]
        self.vae = load_vae(sd, device=self.device, dtype=vae_dtype) if latents else None
        self.dataset = ImageDataset(self.rows, manifest.resolution, manifest.crop, manifest.crop_seed)
        teacher = _teacher_id(manifest)
        self.llm_tokenizer, self.llm = load_llm(
            llm or teacher, load_in_8bit=manifest.llm_8bit, dtype=DTYPES[manifest.llm_dtype], device=self.device
        )
        width = getattr(self.llm.config, "hidden_size", None)
        if width != manifest.llm_width:
            raise ValueError(
                f"--llm {llm or teacher}: its hidden size is {width}, the store's LLM features are "
                f"{manifest.llm_width} wide; pass the store's teacher ({teacher}) or drop --llm"
            )

    def fetch(self, indices: np.ndarray, flipped: np.ndarray) -> dict[str, torch.Tensor]:
        rows = [self.rows[i] for i in indices]
        texts = [row.text for row in rows]
        simple = encode_prompts(self.text, texts)
        features = {
            "clip_simple": simple.embeddings,
            "clip_complex": encode_prompts(self.text, [row.prompt for row in rows]).embeddings,
            "llm": encode_llm(
                self.llm_tokenizer,
                self.llm,
                texts,
                layer=extracted_layers(self.manifest),  # [B, L, D] for a multi-layer store, as stored
                pooling=self.manifest.llm_pooling,
                max_length=self.manifest.tokenizer_max_length,
                chat_template=self.manifest.llm_chat_template,
            ).pooled,
        }
        if self.vae is not None:
            items = [self.dataset[int(i)] for i in indices]
            bad = [item["error"] for item in items if item["error"]]
            if bad:
                raise ValueError(f"--online: an image the store has as done no longer decodes: {bad[0]}")
            pixels = torch.stack([item["pixels"] for item in items])
            pixels = torch.where(torch.from_numpy(flipped)[:, None, None, None], pixels.flip(-1), pixels)
            distribution = encode_vae(self.vae, pixels)
            features["latent_mean"], features["latent_logvar"] = distribution.mean, distribution.logvar
            if simple.pooled is not None:  # SDXL: the UNet's added conditioning
                features["pooled_simple"] = simple.pooled
                features["original_size"] = torch.stack([item["original_size"] for item in items])
                features["crop_offset"] = torch.stack([item["crop_offset"] for item in items])
        return {name: tensor.float() for name, tensor in features.items()}


def _teacher_id(manifest: Manifest) -> str:
    if manifest.llm_model is None:
        raise ValueError(
            "--online recomputes the LLM features, but this store's came from a feature file (llm_features_file "
            "in its manifest), which no model reproduces; train from the cache instead"
        )
    return manifest.llm_model.id


def _matching_rows(manifest: Manifest, data: Path) -> list:
    """The dataset's usable rows, refusing a dataset other than the one the store was extracted from."""
    if metadata_sha256(data) != manifest.metadata_sha256:
        raise ValueError(
            f"--data {data}: metadata.jsonl differs from the one the store was extracted from "
            f"({manifest.dataset_path}); pass that dataset folder"
        )
    columns = manifest.columns
    rows, _ = read_metadata(data, text_column=columns.text, prompt_column=columns.prompt, image_column=columns.image)
    if names_sha256([row.file_name for row in rows]) != manifest.file_names_sha256:
        raise ValueError(
            f"--data {data}: its usable rows differ from the store's samples (an image was added or removed since "
            "extraction); re-extract the store or restore the dataset"
        )
    return rows
