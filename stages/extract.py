"""Stage one: a SURD folder -> a feature store, running the frozen CLIP, VAE and LLM once per sample.

SD 1.x/2.x and SDXL (detected from the model's model_index.json): for SDXL, both text encoders' penultimate states
(concatenated), the pooled `text_embeds` of both prompts and each image's original size are stored too, and the VAE
runs in float32 by default (docs/models.md).

    setup    read and check the metadata, build the manifest (the LLM batch size picked from free memory when
             `auto`), create or resume the store (main process first)
    extract  for each pending shard this process owns: decode images (DataLoader workers), CLIP + VAE, and the
             LLM, overlapped (one pass, each encoder in its own thread and CUDA stream) or in two passes
    cleanup  merge the skip reports, summarise

Supports: any number of processes (`torchrun`/`accelerate launch`; process r takes shards r, r + world, ...),
resume after a crash at any point (unfinished shards are recomputed whole, at the same batch boundaries, so the
result is bit-identical to an uninterrupted run), a reference `{simple prompt: vector}` file instead of an LLM.
With `overlap` (auto: on a GPU when all three models fit its free memory, `sur_cache.memory_plan`) CLIP, the VAE
and the LLM are loaded together and the image half and the LLM half of each shard run concurrently; otherwise the
LLM is loaded after CLIP and the VAE are freed. Both write the same bytes: each encoder runs the same batches, and
the image half still decides which samples are skipped before the LLM half's features are checked.

One writer per store: the main process holds the store's writer lock for the whole run (the other processes of the
same launch share it); a second extract on the same `--out` is refused naming the holder.

Raises ValueError for bad options or data (no usable row, `strict` with a bad row, a wrong LLM feature file, a
`memory://` `--out`), ManifestMismatchError when `--out` holds a store made with other settings, FileExistsError
when it holds something that is not a sur-cache store, StoreLockedError when another run writes it.
"""

from __future__ import annotations

import gc
import hashlib
import os
import pickle
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from sur_cache import __version__
from sur_cache.choices import LLM_BATCH_SIZE_CPU
from sur_cache.config import ExtractConfig
from sur_cache.dataset import (
    BadRow,
    ImageDataset,
    Row,
    digest_array,
    file_problem,
    metadata_sha256,
    read_metadata,
    text_sha256,
)
from sur_cache.devices import AUTO, resolve_device, resolve_dtype
from sur_cache.locations import StoreURLError, in_process_only
from sur_cache.memory_plan import (
    LLMFootprint,
    fits_alongside,
    image_pass_bytes,
    llm_bytes_per_prompt,
    llm_weight_bytes,
    pick_llm_batch_size,
)
from sur_cache.models import (
    DTYPES,
    LLM_LAYER_SOURCE,
    LLM_LAYERS_SOURCE,
    LLM_SOURCE,
    SDModelFacts,
    encode_llm,
    encode_prompts,
    encode_vae,
    has_chat_template,
    load_llm,
    load_text_encoders,
    load_vae,
    model_fingerprint,
    naming_the_source,
    resolve_llm,
    sd_model_facts,
)
from sur_cache.store import (
    DONE,
    SKIPPED,
    Columns,
    FeatureStore,
    FileRef,
    Manifest,
    ModelRef,
    name_bytes,
    names_sha256,
)
from sur_cache.teacher_layers import extracted_layers, resolve_layer_list
from sur_cache.writer_lock import HeldLock, writer_lock

_IDENTITY_ARRAYS = ("sample_line", "image_sha256", "text_sha256", "prompt_sha256")  # kept for skipped samples


@dataclass
class _ShardState:
    """What one shard has learned so far: per-sample status (decode failures become SKIPPED) and skip records."""

    start: int
    stop: int
    status: np.ndarray
    skipped: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class _Teacher:
    """The LLM feature's width and layer or layers (resolved, 0-based; both None for a feature file), read without
    loading weights."""

    llm_width: int
    llm_layer: int | None
    llm_layers: tuple[int, ...] | None = None


# ------------------------------------------------------------------------------------------------------------ setup


def load_llm_features(path: Path) -> dict[str, torch.Tensor]:
    """A reference prompt2vec file `{simple prompt: tensor[D]}`, loaded with `weights_only=True`; checks the widths.

    A zip archive declaring far more bytes than its size is refused before torch unpacks it (`sur_cache.torch_files`).
    """
    from sur_cache.torch_files import refuse_inflating_archive

    refuse_inflating_archive(path, "--llm-features")
    try:
        table = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, KeyError, EOFError) as error:  # KeyError: not a torch file at all
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ValueError(
            f"--llm-features {path}: cannot load it as a torch.save'd {{prompt: tensor[D]}} dict of tensors "
            f"(weights_only=True): {type(error).__name__}: {first_line}"
        ) from error
    if not isinstance(table, dict) or not table:
        raise ValueError(f"--llm-features {path}: expected a non-empty dict {{prompt: tensor[D]}}, found {type(table)}")
    widths = Counter()
    for prompt, vector in table.items():
        if not isinstance(prompt, str) or not isinstance(vector, torch.Tensor) or vector.ndim != 1:
            shape = tuple(vector.shape) if isinstance(vector, torch.Tensor) else type(vector).__name__
            raise ValueError(
                f"--llm-features {path}: entry {prompt!r} should map a prompt to a 1-D tensor, found {shape}"
            )
        widths[vector.shape[0]] += 1
    if len(widths) > 1:
        width = widths.most_common(1)[0][0]
        odd = next(p for p, v in table.items() if v.shape[0] != width)
        raise ValueError(
            f"--llm-features {path}: every vector must have one width; most have {width}, "
            f"but {odd!r} has {table[odd].shape[0]} (widths found: {dict(widths)})"
        )
    return table


def _read_rows(config: ExtractConfig, llm_table: dict | None) -> tuple[list[Row], list[BadRow]]:
    """The metadata pass: rows and bad rows, in one stream of the file and no file-system call per row.

    A row's file is checked by the image worker that reads it (missing, outside the folder: a skipped sample), except
    with `--strict`, where every file is checked here so that one error lists every bad row before any model runs.
    """
    rows, bad = read_metadata(
        config.data,
        text_column=config.text_column,
        prompt_column=config.prompt_column,
        image_column=config.image_column,
    )
    if llm_table is not None:
        bad += [
            BadRow(row.line, row.file_name, "missing_llm_feature", f"simple prompt {row.text!r} not in the file")
            for row in rows
            if row.text not in llm_table
        ]
        rows = [row for row in rows if row.text in llm_table]
    if config.strict:
        bad += [BadRow(row.line, row.file_name, *problem) for row in rows if (problem := file_problem(row))]
    bad.sort(key=lambda b: b.line)
    if bad and config.strict:
        listing = "\n  ".join(f"line {b.line}: {b.reason}: {b.detail}" for b in bad[:20])
        raise ValueError(f"--strict: {len(bad)} bad rows in {config.data}:\n  {listing}")
    if not rows:
        reasons = dict(Counter(b.reason for b in bad))
        raise ValueError(f"no usable row in {config.data} (skipped by reason: {reasons}); nothing to extract")
    return rows, bad


def _sd_facts(config: ExtractConfig) -> SDModelFacts:
    facts = sd_model_facts(config.sd)
    resolution = _resolution(config, facts)
    if resolution % facts.vae_downsampling:
        raise ValueError(
            f"--resolution {resolution} must be a multiple of the VAE's downsampling {facts.vae_downsampling}"
        )
    return facts


def _resolution(config: ExtractConfig, sd: SDModelFacts) -> int:
    return config.resolution if config.resolution is not None else sd.default_resolution


def _vae_dtype(config: ExtractConfig, sd: SDModelFacts, device: torch.device) -> str | None:
    """The VAE's dtype, None when it is the text encoders' (`Manifest.vae_dtype`). `auto`: float32 for an SDXL VAE
    whose config asks to be upcast (SDXL's overflows in float16, as StableDiffusionXLPipeline knows), else sd_dtype."""
    sd_dtype = resolve_dtype(config.sd_dtype, device)
    if config.vae_dtype != AUTO:
        chosen = resolve_dtype(config.vae_dtype, device)
    else:
        chosen = "float32" if sd.kind == "sdxl" and sd.vae_force_upcast else sd_dtype
    return None if chosen == sd_dtype else chosen


def _teacher(config: ExtractConfig, llm_table: dict | None) -> _Teacher:
    if llm_table is not None:
        return _Teacher(next(iter(llm_table.values())).shape[0], None)
    from transformers import AutoConfig

    with naming_the_source("--llm", config.llm, LLM_SOURCE):
        llm = AutoConfig.from_pretrained(resolve_llm(config.llm), trust_remote_code=config.trust_remote_code)
    if config.llm_chat_template:
        _require_chat_template(config)
    text = llm.get_text_config()  # the config itself, or a multimodal model's language part
    count = text.num_hidden_layers
    if config.llm_layers is not None:
        return _Teacher(text.hidden_size, None, resolve_layer_list(config.llm_layers, count, config.llm))
    if not -count <= config.llm_layer < count:
        raise ValueError(f"--llm-layer {config.llm_layer} is out of range: {config.llm} has {count} layers")
    return _Teacher(text.hidden_size, config.llm_layer % count)


def _require_chat_template(config: ExtractConfig) -> None:
    """--llm-chat-template is refused before any model runs when the LLM's tokenizer has no template."""
    from transformers import AutoTokenizer

    with naming_the_source("--llm", config.llm, LLM_SOURCE):
        tokenizer = AutoTokenizer.from_pretrained(resolve_llm(config.llm), trust_remote_code=config.trust_remote_code)
    if not has_chat_template(tokenizer):
        raise ValueError(
            f"--llm-chat-template: the tokenizer of --llm {config.llm} has no chat template; drop the flag to encode "
            "the prompts raw, or pass an instruct/chat model"
        )


def _llm_batch_size(config: ExtractConfig, manifest: Manifest, device: torch.device) -> int | None:
    """`--llm-batch-size` resolved: the given one; for `auto` the one recorded by the store being resumed, else on
    CUDA the largest that fits the free memory (beside CLIP and the VAE unless --no-overlap), LLM_BATCH_SIZE_CPU
    elsewhere. None with a feature file (no LLM runs)."""
    if manifest.llm_model is None:
        return None
    if config.llm_batch_size is not None:
        return config.llm_batch_size
    if not config.overwrite and FeatureStore.exists(config.out, config.storage_options):
        recorded = FeatureStore.open(config.out, storage_options=config.storage_options).manifest.llm_batch_size
        if recorded is not None:
            return recorded
    if device.type != "cuda":
        return LLM_BATCH_SIZE_CPU
    free, _ = torch.cuda.mem_get_info(device)
    llm, image = _llm_footprint(config, manifest), _image_pass_bytes(manifest)
    size = pick_llm_batch_size(free, llm, 0 if config.overlap is False else image)
    if config.overlap is None and not fits_alongside(free, llm, size, image):
        size = pick_llm_batch_size(free, llm)  # auto will not overlap: the LLM runs alone
    return size


def _overlap(config: ExtractConfig, manifest: Manifest, device: torch.device) -> bool:
    """`--overlap` resolved for this process: `auto` overlaps on CUDA when the LLM at the store's batch size and the
    image pass fit the free memory together (never with a feature file: its look-ups take no time)."""
    if config.overlap is not None:
        return config.overlap
    if device.type != "cuda" or manifest.llm_model is None:
        return False
    free, _ = torch.cuda.mem_get_info(device)
    llm = _llm_footprint(config, manifest)
    return fits_alongside(free, llm, manifest.llm_batch_size, _image_pass_bytes(manifest))


def _llm_footprint(config: ExtractConfig, manifest: Manifest) -> LLMFootprint:
    from transformers import AutoConfig

    with naming_the_source("--llm", config.llm, LLM_SOURCE):
        llm = AutoConfig.from_pretrained(resolve_llm(config.llm), trust_remote_code=config.trust_remote_code)
    text = llm.get_text_config()
    width = text.hidden_size
    mlp_width = getattr(text, "intermediate_size", None) or 4 * width
    weights = llm_weight_bytes(
        llm,
        load_in_8bit=manifest.llm_8bit,
        dtype_bytes=DTYPES[manifest.llm_dtype].itemsize,
        trust_remote_code=config.trust_remote_code,
    )
    per_prompt = llm_bytes_per_prompt(width, mlp_width, text.num_attention_heads, manifest.tokenizer_max_length)
    return LLMFootprint(weights, per_prompt)


def _image_pass_bytes(manifest: Manifest) -> int:
    return image_pass_bytes(manifest.batch_size, manifest.resolution, DTYPES[manifest.vae_compute_dtype].itemsize)


def _sd_fingerprint(sd: str, kind: str) -> ModelRef:
    """One revision for the SD parts we use (tokenizers, text encoders, VAE), not the UNet we never load."""
    used = ("tokenizer", "text_encoder", "vae") + (("tokenizer_2", "text_encoder_2") if kind == "sdxl" else ())
    parts = [model_fingerprint(sd, sub) for sub in used]
    revisions = {part["revision"] for part in parts}
    if len(revisions) == 1:  # a hub commit covers all parts
        return ModelRef(sd, revisions.pop())
    combined = hashlib.sha256("\n".join(part["revision"] for part in parts).encode()).hexdigest()
    return ModelRef(str(Path(sd).resolve()) if Path(sd).exists() else sd, f"sha256:{combined}")


def _teacher_fields(config: ExtractConfig) -> dict[str, Any]:
    """The manifest fields of the LLM feature's source; the model-only settings are None with a feature file."""
    if config.llm_features is not None:
        digest = hashlib.sha256(Path(config.llm_features).read_bytes()).hexdigest()
        return {
            "llm_model": None,
            "llm_features_file": FileRef(str(Path(config.llm_features).resolve()), digest),
            "llm_layer_source": "llm_features_file",
            "llm_chat_template": False,
            **dict.fromkeys(("llm_pooling", "llm_8bit", "llm_dtype", "llm_batch_size")),
        }
    return {
        "llm_model": ModelRef(**model_fingerprint(config.llm)),
        "llm_features_file": None,
        "llm_layer_source": LLM_LAYER_SOURCE if config.llm_layers is None else LLM_LAYERS_SOURCE,
        "llm_chat_template": config.llm_chat_template,
        "llm_pooling": config.llm_pooling,
        "llm_8bit": config.llm_8bit,
        "llm_dtype": config.llm_dtype,
        "llm_batch_size": config.llm_batch_size,
    }


def build_manifest(
    config: ExtractConfig, rows: list[Row], sd: SDModelFacts, teacher: _Teacher, device: torch.device
) -> Manifest:
    """Everything that decides the stored numbers and the layout; a resumed run must match it field by field."""
    names = [row.file_name for row in rows]
    resolution = _resolution(config, sd)
    return Manifest(
        sur_cache_version=__version__,
        sd_model=_sd_fingerprint(config.sd, sd.kind),
        sd_dtype=resolve_dtype(config.sd_dtype, device),
        **_teacher_fields(config),
        llm_layer=teacher.llm_layer,
        llm_layers=teacher.llm_layers,
        llm_per_token=config.llm_per_token,
        resolution=resolution,
        crop=config.crop,
        crop_seed=config.seed,
        flip_variants=config.flip_variants,
        batch_size=config.batch_size,
        dataset_path=str(Path(config.data).resolve()),
        metadata_sha256=metadata_sha256(config.data),
        columns=Columns(config.text_column, config.prompt_column, config.image_column),
        num_samples=len(rows),
        file_names_sha256=names_sha256(names),
        file_name_bytes=name_bytes(names),
        tokenizer_max_length=sd.tokenizer_max_length,
        clip_width=sd.clip_width,
        llm_width=teacher.llm_width,
        latent_channels=sd.latent_channels,
        latent_size=resolution // sd.vae_downsampling,
        vae_scaling_factor=sd.vae_scaling_factor,
        store_dtype=config.store_dtype,
        shard_rows=config.shard_rows,
        chunk_rows=min(config.chunk_rows, config.shard_rows),
        compression=config.compression,
        sd_kind=sd.kind,
        pooled_width=sd.pooled_width,
        vae_dtype=_vae_dtype(config, sd, device),
    )


def _open_store(config: ExtractConfig, manifest: Manifest, rows: list[Row]) -> FeatureStore:
    options = config.storage_options
    if FeatureStore.exists(config.out, options) and not config.overwrite:
        store = FeatureStore.open(config.out, mode="r+", expected=manifest, storage_options=options)
    else:
        names = [row.file_name for row in rows]
        store = FeatureStore.create(config.out, manifest, names, overwrite=config.overwrite, storage_options=options)
    store.remove_partial_files()
    return store


def default_num_workers(num_processes: int) -> int:
    """Image-decoding workers per process: the cores left after each process's own thread, at most 8."""
    return max(0, min(8, (os.cpu_count() or 1) // num_processes - 1))


# ---------------------------------------------------------------------------------------------------------- encoders


def _batches(start: int, stop: int, batch_size: int) -> list[tuple[int, int]]:
    """Fixed batch boundaries inside a shard: the same on every run and every process (bit-identical results)."""
    return [(b, min(b + batch_size, stop)) for b in range(start, stop, batch_size)]


class _ImageTextEncoder:
    """CLIP of both prompts, the VAE's latent distribution (and its mirror), hashes and truncation flags; for SDXL
    also the pooled embeddings and the original image sizes."""

    def __init__(self, config: ExtractConfig, manifest: Manifest, rows: list[Row], device: torch.device, workers: int):
        dtype = DTYPES[manifest.sd_dtype]
        self.config, self.manifest, self.rows, self.device = config, manifest, rows, device
        self.text = load_text_encoders(config.sd, manifest.sd_kind, device=device, dtype=dtype)
        self.vae = load_vae(config.sd, device=device, dtype=DTYPES[manifest.vae_compute_dtype])
        flip = manifest.flip_variants
        self.dataset = ImageDataset(rows, manifest.resolution, manifest.crop, manifest.crop_seed, flip=flip)
        self.workers = workers

    def encode(self, shards: list[_ShardState]) -> Iterator[dict[str, np.ndarray]]:
        """One dict of arrays per shard, in order; decode failures mark the shard's samples SKIPPED.

        The decoding workers start here, before the stream is read: before any encoder thread runs, so that no
        worker is forked from a process with another thread inside a torch op."""
        per_shard = [_batches(s.start, s.stop, self.manifest.batch_size) for s in shards]
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=[list(range(a, b)) for batches in per_shard for a, b in batches],
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
        )
        return self._shards(iter(loader), shards, per_shard)

    def _shards(self, items, shards, per_shard) -> Iterator[dict[str, np.ndarray]]:
        for shard, batches in zip(shards, per_shard, strict=True):
            parts = [self._encode_batch(next(items), shard) for _ in batches]
            yield {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}

    def _encode_batch(self, batch: dict, shard: _ShardState) -> dict[str, np.ndarray]:
        positions = batch["position"].tolist()
        rows = [self.rows[p] for p in positions]
        for position, error in zip(positions, batch["error"], strict=True):
            if error:
                self._skip(shard, position, error)
        simple = encode_prompts(self.text, [r.text for r in rows])
        complex_ = encode_prompts(self.text, [r.prompt for r in rows])
        latents = encode_vae(self.vae, batch["pixels"].to(self.device))
        out = {
            "clip_simple": simple.embeddings.cpu().numpy(),
            "clip_complex": complex_.embeddings.cpu().numpy(),
            "latent_mean": latents.mean.cpu().numpy(),
            "latent_logvar": latents.logvar.cpu().numpy(),
            "sample_line": np.array([r.line for r in rows], dtype=np.int64),
            "truncated": torch.stack([simple.truncated, complex_.truncated], 1).cpu().numpy(),
            "crop_offset": batch["crop_offset"].numpy().astype(np.int32),
            "image_sha256": batch["image_sha256"].numpy(),
            "text_sha256": np.stack([digest_array(text_sha256(r.text)) for r in rows]),
            "prompt_sha256": np.stack([digest_array(text_sha256(r.prompt)) for r in rows]),
        }
        if self.manifest.sd_kind == "sdxl":
            out["pooled_simple"] = simple.pooled.cpu().numpy()
            out["pooled_complex"] = complex_.pooled.cpu().numpy()
            out["original_size"] = batch["original_size"].numpy().astype(np.int32)
        if self.manifest.flip_variants:
            flipped = encode_vae(self.vae, batch["pixels_flipped"].to(self.device))
            out["latent_mean_flipped"] = flipped.mean.cpu().numpy()
            out["latent_logvar_flipped"] = flipped.logvar.cpu().numpy()
        return out

    def _skip(self, shard: _ShardState, position: int, error: str) -> None:
        row = self.rows[position]
        reason, _, detail = error.partition(": ")
        if self.config.strict:
            raise ValueError(f"--strict: line {row.line} ({row.file_name}): {error}")
        shard.status[position - shard.start] = SKIPPED
        shard.skipped.append(asdict(BadRow(row.line, row.file_name, reason, detail)))


class _LLMEncoder:
    """One LLM layer's hidden states of the simple prompts, pooled (and per token if asked), or several layers'."""

    def __init__(self, config: ExtractConfig, manifest: Manifest, rows: list[Row], device: torch.device):
        self.manifest, self.rows = manifest, rows
        self.tokenizer, self.model = load_llm(
            config.llm,
            load_in_8bit=manifest.llm_8bit,
            dtype=DTYPES[manifest.llm_dtype],
            device=device,
            trust_remote_code=config.trust_remote_code,
        )

    def encode(self, shards: list[_ShardState]) -> Iterator[dict[str, np.ndarray]]:
        for shard in shards:
            batches = _batches(shard.start, shard.stop, self.manifest.llm_batch_size)
            parts = [self._encode_batch(a, b) for a, b in batches]
            yield {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}

    def _encode_batch(self, start: int, stop: int) -> dict[str, np.ndarray]:
        features = encode_llm(
            self.tokenizer,
            self.model,
            [row.text for row in self.rows[start:stop]],
            layer=extracted_layers(self.manifest),
            pooling=self.manifest.llm_pooling,
            per_token=self.manifest.llm_per_token,
            max_length=self.manifest.tokenizer_max_length,
            chat_template=self.manifest.llm_chat_template,
        )
        out = {"llm": features.pooled.cpu().numpy()}
        if self.manifest.llm_per_token:
            out["llm_tokens"], out["llm_mask"] = features.tokens.cpu().numpy(), features.mask.cpu().numpy()
        return out


class _LLMTableEncoder:
    """LLM features looked up in a reference `{simple prompt: vector}` file instead of running a model."""

    def __init__(self, table: dict[str, torch.Tensor], rows: list[Row]):
        self.table, self.rows = table, rows

    def encode(self, shards: list[_ShardState]) -> Iterator[dict[str, np.ndarray]]:
        for shard in shards:
            vectors = [self.table[row.text].float().numpy() for row in self.rows[shard.start : shard.stop]]
            yield {"llm": np.stack(vectors)}


# ---------------------------------------------------------------------------------------------------------- extract


def _passes(config, manifest, rows, device, workers, llm_table, overlap: bool) -> list[tuple[str, Callable[[], list]]]:
    """(label, factory of the pass's encoders) per pass; each pass's models are loaded when it starts and freed when
    it ends. Overlapped, one pass holds both encoders, the image encoder first: it decides which samples are
    skipped."""
    image = partial(_ImageTextEncoder, config, manifest, rows, device, workers)
    if llm_table is not None:
        llm, label = partial(_LLMTableEncoder, llm_table, rows), "llm-features"
    else:
        llm, label = partial(_LLMEncoder, config, manifest, rows, device), "llm"
    if overlap:
        return [(f"clip+vae+{label}", lambda: [image(), llm()])]
    return [("clip+vae", lambda: [image()]), (label, lambda: [llm()])]


_END = object()  # what an encoder's stream gives after its last shard


def _shard_parts(encoders: list, shards: list[_ShardState], device: torch.device) -> Iterator[list[dict]]:
    """Per shard, each encoder's arrays, in the encoders' order.

    One encoder runs in this thread. Several run concurrently, each in its own thread and, on CUDA, its own stream
    (torch releases the GIL inside its ops, so the threads overlap on the CPU too), each at most one shard ahead
    of this thread: the shards in flight, and so the memory, stay bounded.
    """
    streams = [encoder.encode(shards) for encoder in encoders]  # in order: the image workers start first
    if len(streams) == 1:
        yield from ([arrays] for arrays in streams[0])
        return
    with ThreadPoolExecutor(max_workers=len(streams), thread_name_prefix="encoder") as pool:
        ahead = [_one_shard_ahead(stream, pool, device) for stream in streams]
        for _ in shards:
            yield [next(stream) for stream in ahead]


def _one_shard_ahead(stream: Iterator, pool: Executor, device: torch.device) -> Iterator:
    """`stream`'s items, each computed in `pool` (on a CUDA stream of its own) while the previous one is used."""
    cuda_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    if cuda_stream is not None:
        cuda_stream.wait_stream(torch.cuda.current_stream(device))  # the weights loaded on the default stream

    def step():
        with torch.cuda.stream(cuda_stream) if cuda_stream is not None else nullcontext():
            return next(stream, _END)

    future = pool.submit(step)
    while (item := future.result()) is not _END:
        future = pool.submit(step)
        yield item


def _checked(state: _ShardState, arrays: dict[str, np.ndarray], rows, config, store_dtype: str) -> dict:
    """One encoder's arrays of a shard, its non-finite samples marked skipped and every skipped sample's features
    zeroed (their identity kept). Applied per encoder, in the encoders' order, when its arrays arrive: the image
    encoder's arrays are zeroed by the skips known after them, the LLM's by all, in both modes alike."""
    _skip_non_finite(state, arrays, rows, config, store_dtype)
    skipped = state.status == SKIPPED
    if not skipped.any():
        return arrays
    return {
        name: a if name in _IDENTITY_ARRAYS else np.where(_expand(skipped, a.ndim), np.zeros_like(a), a)
        for name, a in arrays.items()
    }


def _skip_non_finite(
    shard: _ShardState, arrays: dict[str, np.ndarray], rows: list[Row], config: ExtractConfig, store_dtype: str
) -> None:
    """Mark SKIPPED every sample with a NaN or inf in a feature, counting values that overflow the store's dtype.

    An fp16 VAE can return NaNs and an fp16 store turns values above 65504 into inf; stored as done, either would
    poison every training step that draws the sample.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        finite = [
            np.isfinite(a.astype(store_dtype)).reshape(len(a), -1).all(axis=1)
            for name, a in arrays.items()
            if name not in _IDENTITY_ARRAYS and a.dtype.kind == "f"
        ]
    for offset in np.flatnonzero(~np.logical_and.reduce(finite)) if finite else ():
        if shard.status[offset] == SKIPPED:
            continue
        row = rows[shard.start + offset]
        if config.strict:
            raise ValueError(f"--strict: line {row.line} ({row.file_name}): a feature is NaN or inf")
        shard.status[offset] = SKIPPED
        detail = f"a feature is NaN or inf in {store_dtype}"
        shard.skipped.append(asdict(BadRow(row.line, row.file_name, "non_finite_feature", detail)))


def _expand(mask: np.ndarray, ndim: int) -> np.ndarray:
    return mask.reshape(mask.shape + (1,) * (ndim - 1))


def _extract_shards(
    store,
    mine: list[int],
    passes,
    rows: list[Row],
    config: ExtractConfig,
    device: torch.device,
    show_progress: bool,
    lock: HeldLock,
) -> float:
    """Run each pass over this process's shards; a background thread writes shard k while shard k + 1 computes.

    Returns the seconds spent in the passes once their models were loaded (the encoding throughput's time)."""
    ranges = store.shard_ranges()
    states = [_ShardState(*ranges[i], np.full(ranges[i][1] - ranges[i][0], DONE, np.uint8)) for i in mine]
    total, seconds = sum(s.stop - s.start for s in states), 0.0
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer") as writer:
        for number, (label, make_encoders) in enumerate(passes):
            encoders, commit, pending = make_encoders(), number == len(passes) - 1, None
            started = time.perf_counter()
            with tqdm(total=total, unit="sample", desc=label, disable=not show_progress, dynamic_ncols=True) as bar:
                parts_per_shard = _shard_parts(encoders, states, device)
                for index, state, parts in zip(mine, states, parts_per_shard, strict=True):
                    dtype = store.manifest.store_dtype
                    parts = [_checked(state, part, rows, config, dtype) for part in parts]  # image half first
                    arrays = {name: array for part in parts for name, array in part.items()}
                    if pending is not None:
                        pending.result()  # at most one shard waits for the disk
                    pending = writer.submit(_write_shard, store, index, state, arrays, commit, lock)
                    bar.update(state.stop - state.start)
                if pending is not None:
                    pending.result()
            seconds += time.perf_counter() - started
            del encoders, parts_per_shard
            _free_memory()
    return seconds


def _write_shard(
    store, index: int, state: _ShardState, arrays: dict[str, np.ndarray], commit: bool, lock: HeldLock
) -> None:
    store.write_arrays(index, arrays)
    if commit:  # the commit: skip report first, status last
        lock.check()  # an S3 lease lost to another writer: stop before committing into its store
        store.write_skipped(index, state.skipped)
        store.commit_shard(index, state.status)


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_extract(config: ExtractConfig) -> dict[str, Any]:
    """Extract every pending sample of `config.data` into the store at `config.out`; returns the summary."""
    from accelerate import PartialState

    started = time.perf_counter()
    if in_process_only(config.out):
        raise StoreURLError(
            f"--out {config.out}: a memory:// store lives inside this process and is gone when extract exits; pass "
            "a folder or a URL that outlives it (file://..., s3://...)"
        )
    device = resolve_device(config.device)  # builds accelerate's state to agree (gloo for CPU processes)
    state = PartialState()
    llm_table = load_llm_features(config.llm_features) if config.llm_features is not None else None
    finished = _finished_store(config)
    rows, bad = ([], None) if finished is not None else _read_rows(config, llm_table)
    if not state.is_main_process:
        return _write_store(config, state, rows, device, llm_table, started)
    manifest = build_manifest(config, rows, _sd_facts(config), _teacher(config, llm_table), device)
    manifest = replace(manifest, llm_batch_size=_llm_batch_size(config, manifest, device))
    if finished is not None:  # the rows the metadata pass would give are the store's: same file, same settings
        manifest = replace(manifest, **{key: getattr(finished.manifest, key) for key in _ROW_FIELDS})
    # before the lock file goes in: never into a folder that is not ours
    FeatureStore.refuse_foreign(config.out, config.storage_options)
    # the main process holds it for the whole run; the other ranks share it
    with writer_lock(config.out, config.storage_options) as lock:
        store = _open_store(config, manifest, rows)
        if bad is not None:
            store.write_skipped(None, [asdict(b) for b in bad])
        return _write_store(config, state, rows, device, llm_table, started, store, lock)


_ROW_FIELDS = ("num_samples", "file_names_sha256", "file_name_bytes")  # the manifest fields the rows decide


def _finished_store(config: ExtractConfig) -> FeatureStore | None:
    """The store at --out when resuming it has nothing left to do, else None: every shard committed and its
    `metadata_sha256` that of --data's metadata.jsonl. Its rows then follow from that file and settings the resume
    compares anyway (columns, the LLM feature file), so the metadata pass (7 s at 1M rows) is skipped. Not with
    --strict, whose contract is to check every row's file, nor --overwrite."""
    if config.overwrite or config.strict or not FeatureStore.exists(config.out, config.storage_options):
        return None
    store = FeatureStore.open(config.out, storage_options=config.storage_options)
    if store.manifest.metadata_sha256 != metadata_sha256(config.data) or store.pending_shards():
        return None
    return store


def _write_store(config, state, rows, device, llm_table, started, store=None, lock=None) -> dict[str, Any]:
    """Every process's part, once the main process has created or resumed `store` (the others open it).

    Only the main process holds `lock` and checks it before its commits; the others' end with the launch."""
    state.wait_for_everyone()
    if store is None:
        store = _open_main_process_store(config, state)
    pending = store.pending_shards()
    mine = [shard for shard in pending if shard % state.num_processes == state.process_index]
    workers = config.num_workers if config.num_workers is not None else default_num_workers(state.num_processes)
    overlap, encoding = bool(mine) and _overlap(config, store.manifest, device), 0.0
    if mine:
        passes = _passes(config, store.manifest, rows, device, workers, llm_table, overlap)
        show_progress = config.progress and state.is_main_process
        encoding = _extract_shards(store, mine, passes, rows, config, device, show_progress, lock or HeldLock())
    state.wait_for_everyone()
    if state.is_main_process and (pending or not store.has_commit_index()):
        (lock or HeldLock()).check()  # as before a commit: an S3 lease lost means another writer's store
        store.write_commit_index()  # every process has committed: inspect reads this file, not one per shard
    summary = _summarise(store, pending, time.perf_counter() - started)
    summary.update(overlap=overlap, encode_seconds=round(encoding, 2))
    if state.is_main_process:
        summary["report"] = store.write_skipped_report()
    if summary["complete"] == 0:
        raise ValueError(f"no sample of {config.data} could be extracted: {summary['skipped']}; see {config.out}")
    return summary


def _open_main_process_store(config: ExtractConfig, state) -> FeatureStore:
    """The store the main process has just created or resumed, opened by another process; not finding it means the
    processes do not share --out (a node-local disk on several nodes)."""
    try:
        return FeatureStore.open(config.out, mode="r+", storage_options=config.storage_options)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"process {state.process_index} finds no store at --out {config.out}, which the main process has just "
            "created: on several nodes --out must be a folder all of them see (a shared filesystem) or an s3:// URL, "
            "not a node-local disk (docs/scale.md)"
        ) from None


def _summarise(store: FeatureStore, pending: list[int], seconds: float) -> dict[str, Any]:
    """The store's counts and truncations (from its commit markers: no array is read) and this run's speed."""
    summary = store.summary()
    ranges = store.shard_ranges()
    computed = sum(ranges[i][1] - ranges[i][0] for i in pending)
    summary.update(
        store=store.url,
        computed_now=computed,
        seconds=round(seconds, 2),
        samples_per_second=round(computed / seconds, 2) if seconds > 0 else None,
        truncated=store.truncated_counts(),
    )
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """The lines `sur-cache extract` prints at the end."""
    skipped = ", ".join(f"{reason} {n}" for reason, n in summary["skipped"].items()) or "none"
    lines = [
        f"store       {summary['store']}",
        f"done        {summary['complete']} of {summary['num_samples']} samples "
        f"({summary['computed_now']} computed in this run, {summary['samples_per_second']} samples/s)",
        f"encoding    {summary['encode_seconds']} s after the models loaded, "
        + ("CLIP/VAE and LLM overlapped" if summary["overlap"] else "CLIP/VAE, then LLM"),
        f"skipped     {sum(summary['skipped'].values())} ({skipped})",
        f"truncated   {summary['truncated']['simple']} simple, {summary['truncated']['complex']} complex prompts "
        f"longer than the CLIP context",
    ]
    if summary.get("report"):
        lines.append(f"report      {summary['report']}")
    return "\n".join(lines)
