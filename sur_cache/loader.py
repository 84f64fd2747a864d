"""Feature store -> shuffled training batches, keyed by sample index and never by step order.

Order: every epoch, the read units (the store's shards, split further only when there are fewer than processes)
are shuffled with a seeded RNG and dealt to the processes round-robin; each process then shuffles its samples
within a buffer of `buffer_shards` consecutive units. So a process reads each unit with one contiguous range read
per array, holds at most a few units in memory, and no two processes read the same sample. Only complete samples
(status done) are ever served.

Position: a batch is named by `(epoch, batch)`, `batch` counting this process's micro-batches within the epoch.
Everything random about a batch (which flip variant, the latent's noise `eps`, and whatever the trainer draws after
it: diffusion noise and timesteps) comes from generators seeded by `(seed, epoch, batch, rank)`, so a resumed run
sees exactly the batches and draws an uninterrupted run would have seen.

Latents are sampled from the cached distribution at every step, `(mean + exp(logvar / 2) * eps) * scaling_factor`,
as the reference does with `vae.encode(x).latent_dist.sample() * vae.config.scaling_factor`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from sur_cache.check_ahead import WINDOW, CheckedArray, ChunkChecks, samples_ahead
from sur_cache.models import DEFAULT_VAE_SCALING_FACTOR, sd_model_facts
from sur_cache.shard_files import MappedShard, ShardDamage
from sur_cache.store import FeatureStore, Manifest, ManifestMismatchError, StoreFormatError

TEXT_ARRAYS = ("clip_simple", "clip_complex", "llm")
LATENT_ARRAYS = ("latent_mean", "latent_logvar")
FLIPPED_ARRAYS = ("latent_mean_flipped", "latent_logvar_flipped")
SDXL_ARRAYS = ("pooled_simple", "original_size", "crop_offset")  # an SDXL UNet's added conditioning
_FINISH_EXTRACTION = "re-run the `sur-cache extract` command that wrote it (it resumes where it stopped)"


# ------------------------------------------------------------------------------------------------------ order


@dataclass(frozen=True)
class ReadUnit:
    """Samples `[start, stop)` read with one range read per array; `samples` are its complete ones, ascending."""

    start: int
    stop: int
    samples: np.ndarray


def read_units(shard_ranges: list[tuple[int, int]], complete: np.ndarray, world_size: int = 1) -> list[ReadUnit]:
    """The store's shards as read units, each split evenly when there are fewer shards than processes.

    `complete` is ascending, so each unit's samples are one slice of it, found by binary search: linear in the
    shards plus a log-N search each, and no copy of the samples. Units without a complete sample are dropped.
    Raises when fewer units than processes remain.
    """
    starts, stops = _unit_bounds(shard_ranges, max(1, -(-world_size // max(1, len(shard_ranges)))))
    first, last = np.searchsorted(complete, starts), np.searchsorted(complete, stops)
    units = [
        ReadUnit(int(a), int(b), complete[i:j])
        for a, b, i, j in zip(starts.tolist(), stops.tolist(), first.tolist(), last.tolist(), strict=True)
        if j > i
    ]
    if not units:
        raise ValueError("the store has no complete sample: " + _FINISH_EXTRACTION)
    if len(units) < world_size:
        raise ValueError(
            f"the store has {len(complete)} complete samples in {len(units)} readable parts, fewer than the "
            f"{world_size} processes: run fewer processes, or {_FINISH_EXTRACTION}"
        )
    return units


def _unit_bounds(shard_ranges: list[tuple[int, int]], pieces: int) -> tuple[np.ndarray, np.ndarray]:
    """`(starts, stops)` of every unit: each shard, or `pieces` even parts of it (fewer if it has fewer rows)."""
    if pieces == 1:
        bounds = np.asarray(shard_ranges, dtype=np.int64).reshape(-1, 2)
        return bounds[:, 0], bounds[:, 1]
    edges = [
        np.linspace(start, stop, min(pieces, stop - start) + 1).round().astype(np.int64) for start, stop in shard_ranges
    ]
    return np.concatenate([e[:-1] for e in edges]), np.concatenate([e[1:] for e in edges])


def epoch_order(
    units: list[ReadUnit], *, seed: int, epoch: int, rank: int = 0, world_size: int = 1, buffer_units: int = 4
) -> np.ndarray:
    """This process's sample indices for one epoch: units shuffled and dealt round-robin, samples shuffled per buffer.

    Every process computes the same unit permutation from `(seed, epoch)`; process `rank` takes every
    `world_size`-th unit, so the processes' samples are disjoint and together cover the store.
    """
    mine = _unit_permutation(len(units), seed, epoch)[rank::world_size]
    rng = np.random.default_rng([seed, epoch, rank])
    buffers = [
        rng.permutation(np.concatenate([units[u].samples for u in mine[b : b + buffer_units]]))
        for b in range(0, len(mine), buffer_units)
    ]
    return np.concatenate(buffers) if buffers else np.empty(0, dtype=np.int64)


def _unit_permutation(count: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(count)


def batches_per_epoch(
    units: list[ReadUnit], *, batch_size: int, seed: int, epoch: int, world_size: int = 1, buffer_units: int = 4
) -> int:
    """Full batches every process can serve this epoch (the same count on all, so they step together).

    Counted from the units' sizes and the epoch's unit permutation: no process's order is built for it.
    `buffer_units` does not change the count (a buffer only reorders its units' samples).
    """
    sizes = np.fromiter((len(u.samples) for u in units), dtype=np.int64, count=len(units))
    dealt = sizes[_unit_permutation(len(units), seed, epoch)]
    return min(int(dealt[rank::world_size].sum()) for rank in range(world_size)) // batch_size


FLIP_STREAM, DRAW_STREAM = 0, 1


def batch_generator(
    seed: int, epoch: int, batch: int, rank: int = 0, stream: int = DRAW_STREAM, device: str | torch.device = "cpu"
) -> torch.Generator:
    """A generator of one batch, a pure function of its position, so resume replays the same draws.

    Stream FLIP_STREAM (on the CPU) picks the flip variants; DRAW_STREAM, on the training device so that no draw is
    copied from the host, gives the latent noise, then the trainer's diffusion noise and timesteps.
    """
    state = np.random.SeedSequence([seed, epoch, batch, rank, stream]).generate_state(2, dtype=np.uint32)
    return torch.Generator(device=device).manual_seed(int(state[0]) << 32 | int(state[1]))


# --------------------------------------------------------------------------------------------------- validation


def check_manifest(manifest: Manifest, sd: str, store_url: str = "the store") -> None:
    """Refuse a store whose features do not fit the SD model (its config files: `models.sd_model_facts`); one error
    names every mismatching field. The store's latent channels must be what the UNet takes (its in_channels); a store
    of one family (sd_kind: SD 1.x/2.x or SDXL) never feeds a model of the other."""
    facts = sd_model_facts(sd)
    fits = {
        "sd_kind": facts.kind,
        "pooled_width": facts.pooled_width,
        "clip_width": facts.clip_width,
        "latent_channels": facts.unet_in_channels,
        "vae_scaling_factor": facts.vae_scaling_factor,
    }
    problems = []
    for field, want in fits.items():
        found = getattr(manifest, field)
        if found != want and not (field == "vae_scaling_factor" and _close(found, want)):
            problems.append(f"{field}: the SD model --sd {sd} has {want}, {store_url} has {found}")
    if facts.cross_attention_dim != facts.clip_width:
        problems.append(
            f"cross_attention_dim: the UNet of {sd} expects {facts.cross_attention_dim}-wide text embeddings, "
            f"its text encoder gives {facts.clip_width}"
        )
    if facts.kind == "sdxl" and facts.unet_in_channels is not None and not facts.time_ids_fit:
        problems.append(
            f"projection_class_embeddings_input_dim: the UNet of {sd} takes {facts.projection_input_dim}, not six "
            f"time ids of {facts.addition_time_embed_dim} plus the {facts.pooled_width}-wide pooled embedding"
        )
    if problems:
        raise ManifestMismatchError(
            f"{store_url} was not extracted for --sd {sd}:\n  "
            + "\n  ".join(problems)
            + "\nPass the --sd model the store was extracted with, or extract a new store for this model."
        )


def _close(a: Any, b: float) -> bool:
    return isinstance(a, (int, float)) and abs(a - b) <= 1e-9 * max(1.0, abs(b))


# ------------------------------------------------------------------------------------------------------ sources


class FeatureSource(Protocol):
    """Where a batch's features come from: the store (cached), memory (preloaded), or the frozen models (online).

    `fetch` returns tensors (any float dtype; the loader converts them to float32 on the training device)
    `clip_simple`, `clip_complex` [B, L, d], `llm` [B, D] and, when latents are wanted, `latent_mean`,
    `latent_logvar` [B, c, s, s] (of the flipped image where `flipped` is True), and for SDXL `pooled_simple` [B, p],
    `original_size`, `crop_offset` [B, 2].
    Optional: `plan(indices)`, told the epoch's samples in order before its first fetch, and `close()`.
    """

    def fetch(self, indices: np.ndarray, flipped: np.ndarray) -> dict[str, torch.Tensor]: ...


def array_names(*, latents: bool, flips: bool, sdxl: bool = False) -> list[str]:
    """The store arrays a run reads: text features always, latents unless features-only, flips if drawn, and for
    an SDXL UNet its added conditioning."""
    names = list(TEXT_ARRAYS)
    if latents:
        names += LATENT_ARRAYS
        if flips:
            names += FLIPPED_ARRAYS
        if sdxl:
            names += SDXL_ARRAYS
    return names


def sdxl_conditioning(features: dict[str, torch.Tensor], target_size: int) -> dict[str, torch.Tensor]:
    """An SDXL UNet's `added_cond_kwargs` for a batch: the simple prompt's pooled `text_embeds` and the six time ids
    (original height and width, crop top and left, target height and width), in the order of
    `StableDiffusionXLPipeline._get_add_time_ids` (tested against it); the target is the store's square resolution.

    A flipped variant keeps its unflipped crop's ids (docs/models.md)."""
    original, crop = features["original_size"].float(), features["crop_offset"].float()
    target = original.new_full(original.shape, float(target_size))
    return {"text_embeds": features["pooled_simple"], "time_ids": torch.cat([original, crop, target], dim=1)}


_MIRROR = dict(zip(LATENT_ARRAYS, FLIPPED_ARRAYS, strict=True))
_PLAIN = dict(zip(FLIPPED_ARRAYS, LATENT_ARRAYS, strict=True))


def _to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`; pinned first on CUDA, so the copy neither waits for the GPU nor blocks the host."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


class _UnitReads(torch.utils.data.Dataset):
    """`(unit, slot)` -> decode the unit's rows of the named arrays into shared-memory slot `slot`; returns the pair.

    The slots are allocated once by the training process and shared with the reader at its start, so a unit is
    handed over by its slot number: no fresh shared memory, page faults or file descriptors per unit. The store is
    opened read-only in the reader process.
    """

    def __init__(
        self, url: str, options, units: list[ReadUnit], names: list[str], slots: dict[str, torch.Tensor]
    ) -> None:
        self.url, self.options, self.units, self.names, self.slots = url, options, units, names, slots
        self._store: FeatureStore | None = None

    def __len__(self) -> int:
        return len(self.units)

    def __getitem__(self, request: tuple[int, int]) -> tuple[int, int | str]:
        """`(unit, slot)`, or `(unit, message)` when the store is damaged: the training process raises it as a
        StoreFormatError of its own, instead of a reader-process traceback."""
        unit, slot = request
        if self._store is None:
            self._store = FeatureStore.open(self.url, mode="r", storage_options=self.options)
            for slots in self.slots.values():  # map every page once now, not one page fault at a time per unit
                slots.zero_()
        start, stop = self.units[unit].start, self.units[unit].stop
        out = {name: self.slots[name][slot, : stop - start].numpy() for name in self.names}
        try:
            self._store.read(self.names, start, stop, out=out)  # decoded straight into the slot
        except StoreFormatError as error:
            return unit, str(error)
        return unit, slot

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_store": None}  # each process opens its own handle


class _UnitSequence(torch.utils.data.Sampler):
    """`(unit, slot)` of the units an epoch needs, in the order it first needs them; replaced every epoch."""

    def __init__(self) -> None:
        self.units: list[tuple[int, int]] = []

    def __iter__(self):
        return iter(self.units)

    def __len__(self) -> int:
        return len(self.units)


class StoreSource:
    """Reads whole read units with contiguous range reads and serves samples from the few units in memory.

    `capacity` units stay cached (least recently used dropped first); with the buffered order, two buffers' worth
    means each unit is read once per epoch. With `readers` > 0, reader processes stream the units of the epoch's
    order ahead of the training loop (`plan`); processes, not threads, because zarr's read path is Python-heavy and
    a reader thread would hold the GIL against the loop's kernel launches. With `readers=0` reads are synchronous.

    The readers write into a ring of `capacity + READ_AHEAD * readers` shared-memory slots, unit k of the epoch into
    slot k modulo the ring. A slot is rewritten only once `capacity` newer units have arrived: by then the unit it
    held has left the cache (`_forget_overwritten` makes sure), so a served row is never one a reader is replacing.
    """

    READ_AHEAD = 2  # units each reader reads ahead of the loop (the DataLoader's prefetch_factor)

    def __init__(
        self, store: FeatureStore, units: list[ReadUnit], names: list[str], capacity: int, readers: int = 0
    ) -> None:
        self.store, self.units, self.names, self.capacity = store, units, names, capacity
        self.outputs = [name for name in names if name not in FLIPPED_ARRAYS]
        self._unit_starts = np.array([u.start for u in units], dtype=np.int64)
        self._cache: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        self._sequence = _UnitSequence()
        self._stream = None
        self._reader = None
        self._ring = capacity + self.READ_AHEAD * readers
        self._received: list[int] = []  # the units streamed this epoch, in order
        if readers:
            slots = _shared_slots(store, units, names, self._ring)
            self._slots = {name: slot.numpy() for name, slot in slots.items()}
            self._reader = torch.utils.data.DataLoader(
                _UnitReads(store.url, store.storage_options, units, names, slots),
                batch_size=None,
                sampler=self._sequence,
                num_workers=readers,
                multiprocessing_context="spawn",  # a forked child would inherit zarr's event loop without its thread
                persistent_workers=True,
                prefetch_factor=self.READ_AHEAD,
            )

    def plan(self, indices: np.ndarray) -> None:
        """The samples the next fetches ask for, in order (called at the start of each epoch, or a resume)."""
        if self._reader is not None:
            self._cache.clear()
            units = self._units_of(indices)
            first_use = units[np.sort(np.unique(units, return_index=True)[1])]
            slots = np.arange(len(first_use)) % self._ring
            self._sequence.units = list(zip(first_use.tolist(), slots.tolist(), strict=True))
            self._received = []
            self._stream = iter(self._reader)  # waits for the readers to finish the previous epoch's reads

    def close(self) -> None:
        """Stop the reader processes now; being persistent, they would otherwise live as long as this source.

        No new read starts, the reads in flight are received, and only then are the readers told to exit: a reader
        told while it is reading (zarr's event-loop thread busy) or still handing a unit over (its queue's feeder
        thread in torch's shared-memory code) exits with that thread still running, which can abort the process
        ("terminate called without an active exception", then "DataLoader worker ... killed by signal: Aborted"
        raised here). Waiting costs at most the reads already asked for (two units per reader).
        """
        if self._stream is not None:
            self._sequence.units.clear()  # the sampler's iterator reads this list: nothing is asked for any more
            try:
                for _ in self._stream:
                    pass
            finally:
                self._stream._shutdown_workers()
        self._stream = self._reader = None

    def fetch(self, indices: np.ndarray, flipped: np.ndarray) -> dict[str, torch.Tensor]:
        rows: dict[str, list[np.ndarray]] = {name: [] for name in self.outputs}
        for index, unit, flip in zip(indices, self._units_of(indices), flipped, strict=True):
            block, row = self._unit(int(unit)), index - self.units[unit].start
            for name in self.outputs:
                rows[name].append(block[_MIRROR[name] if flip and name in _MIRROR else name][row])
        return {name: torch.from_numpy(np.stack(rows[name])) for name in self.outputs}

    def _units_of(self, indices: np.ndarray) -> np.ndarray:
        return np.searchsorted(self._unit_starts, indices, side="right") - 1

    def _unit(self, unit: int) -> dict[str, np.ndarray]:
        if unit in self._cache:
            self._cache.move_to_end(unit)
            return self._cache[unit]
        self._cache[unit] = self._next_streamed(unit) if self._stream is not None else self._read(unit)
        while len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return self._cache[unit]

    def _read(self, unit: int) -> dict[str, np.ndarray]:
        return self.store.read(self.names, self.units[unit].start, self.units[unit].stop)

    def _next_streamed(self, unit: int) -> dict[str, np.ndarray]:
        streamed, slot = next(self._stream)
        if isinstance(slot, str):
            raise StoreFormatError(slot)
        if streamed != unit:
            raise RuntimeError(f"reader out of order: expected unit {unit}, got {streamed}; call plan() first")
        self._received.append(unit)
        self._forget_overwritten()
        rows = self.units[unit].stop - self.units[unit].start
        return {name: slots[slot, :rows] for name, slots in self._slots.items()}  # views of the shared slot

    def _forget_overwritten(self) -> None:
        """Drop from the cache the unit whose slot a reader may start rewriting now: once n units have arrived, the
        readers may be writing units up to n - 1 + in-flight, whose slots held units up to n - 1 - capacity. With
        the buffered order that unit is never asked for again, so this drops nothing needed."""
        if len(self._received) > self.capacity:
            self._cache.pop(self._received[-self.capacity - 1], None)


class MappedSource:
    """Gathers each batch's rows straight from the memory-mapped shard files into the batch arrays: one copy from
    the page cache, as a plain numpy memmap, with no reader process and no slot in between.

    For local stores whose arrays use the plain layout (`FeatureStore.map_shard`; check with `maps`). Each chunk's
    crc32c is checked once per process before any of its rows is served; a damaged chunk or a missing file is a
    StoreFormatError naming the array and the shard's samples, as `StoreSource` raises it. With `check_ahead`, `plan`
    starts a process that checks the epoch's chunks ahead of the loop (`sur_cache.check_ahead`), so that the first
    epoch's checksums run beside the loop rather than in it; what it has not reached, the loop checks itself.

    A checked chunk's rows are kept as views, so a batch is one dict lookup per row and one `np.concatenate` per
    array, both in C (a Python call per row was 30% of a later epoch). At most `max_maps` shard files stay mapped,
    far below Linux's default of 65,530 maps a process; the earliest mapped is closed first (row lookups do not track
    use; the buffered order reads a shard's rows within its buffer, and a map closed too early is only made again,
    its checked chunks kept). A map is the file's pages in the page cache, not this process's memory. Batches equal
    `StoreSource`'s.
    """

    MAX_MAPS = 4096  # every shard file of a store up to 585 shards x 7 arrays stays mapped for the whole run
    CHECK_WINDOW = WINDOW

    def __init__(
        self,
        store: FeatureStore,
        names: list[str],
        max_maps: int = MAX_MAPS,
        check_ahead: bool = True,
        processes_per_host: int = 1,
    ) -> None:
        self.store, self.names, self.max_maps = store, names, max_maps
        self.processes_per_host = processes_per_host
        self.ahead: int | None = None  # samples the process checks past the loop; None: `check_ahead.samples_ahead`
        self.outputs = [name for name in names if name not in FLIPPED_ARRAYS]
        self._maps: OrderedDict[tuple[str, int], MappedShard] = OrderedDict()  # in the order they were mapped
        self._views: dict[str, dict[int, np.ndarray]] = {name: {} for name in self.outputs}  # checked rows
        self._verified: dict[tuple[str, int], tuple[tuple, set[int]]] = {}  # file identity, chunks checked
        self._widths: dict[str, int] | None = None
        self._check_ahead = check_ahead
        self._checks: ChunkChecks | None = None  # made at the first plan
        self._mapped_before = np.zeros(len(store.shard_ranges()), dtype=bool)  # shards whose files the loop mapped
        self._served = 0

    @staticmethod
    def maps(store: FeatureStore, names: list[str]) -> bool:
        """Can every named array of `store` be read through maps?"""
        return all(store.direct_layout(name) is not None for name in names)

    def plan(self, indices: np.ndarray) -> None:
        """The samples the next fetches ask for, in order (called at the start of each epoch, or a resume): with
        `check_ahead`, a process checks their chunks from now on, when they include a shard this source has not read
        yet (a later epoch of one process reads the shards its first read, except for a few samples the last
        partial batch left out, which the loop checks itself)."""
        if self._checks is not None:
            self._checks.stop()
        needed = np.bincount(indices // self.store.shard_rows, minlength=len(self._mapped_before)) > 0
        if self._check_ahead and (needed & ~self._mapped_before).any():  # else every chunk it reads was checked
            self._checks = self._checks or self._chunk_checks()
            self._served = 0
            self._checks.start(indices)

    def _chunk_checks(self) -> ChunkChecks:
        """The board for checking the arrays' chunks ahead of the loop: one slot per chunk of every shard of every
        array, and how far ahead (`ahead`, else sized to the memory available now)."""
        arrays, slot = [], 1  # slot 0: the samples served
        for name in self.names:
            layout = self.store.direct_layout(name)
            arrays.append(CheckedArray(name, self.store.shard_path_template(name), layout, slot))
            slot += len(self.store.shard_ranges()) * layout.chunks_per_shard
        sample_bytes = sum(array.layout.row_bytes for array in arrays)
        ahead = self.ahead if self.ahead is not None else samples_ahead(sample_bytes, self.processes_per_host)
        return ChunkChecks(arrays, self.store.shard_rows, slot, ahead, self.CHECK_WINDOW)

    def fetch(self, indices: np.ndarray, flipped: np.ndarray) -> dict[str, torch.Tensor]:
        batch = self._allocate(len(indices))
        plain, variant = indices.tolist(), np.where(flipped, ~indices, indices).tolist()  # keys of `_views`
        for name, array in batch.items():
            rows = self._gather(name, variant if name in _MIRROR else plain)
            np.concatenate(rows, axis=0, out=array.reshape(len(indices), -1).view(np.uint8))  # one copy, in C
        if self._checks is not None:
            self._served += len(indices)
            self._checks.served(self._served)
        return {name: torch.from_numpy(array) for name, array in batch.items()}

    def _gather(self, name: str, keys: list[int]) -> list[np.ndarray]:
        """The row views of `keys` (samples, or `~sample` for a latent's flipped variant): one dict lookup each, in C,
        when every row's chunk is checked already; else each missing row's chunk is mapped and checked first."""
        views = self._views[name]
        try:
            return list(map(views.__getitem__, keys))
        except KeyError:
            return [views[key] if key in views else self._load(name, key) for key in keys]

    def _load(self, name: str, key: int) -> np.ndarray:
        """Check the chunk holding row `key` of output `name` and keep views of all its rows; returns `key`'s view."""
        array, sample = (_MIRROR[name], ~key) if key < 0 else (name, key)
        shard, row = divmod(sample, self.store.shard_rows)
        mapped, chunk_rows = self._map(array, shard), self.store.direct_layout(array).chunk_rows
        try:
            rows = mapped.rows(row // chunk_rows)
        except ShardDamage as error:
            raise self.store.damage_error(array, *self.store.shard_ranges()[shard], error) from None
        first = sample - row % chunk_rows
        count = min(chunk_rows, self.store.shard_ranges()[shard][1] - first)  # an edge chunk's padding is no sample
        keys = range(~first, ~first - count, -1) if key < 0 else range(first, first + count)
        views = self._views[name]
        views.update(
            zip(keys, rows[:count, None], strict=True)
        )  # `[1, row_bytes]` views, made by numpy's iteration in C
        return views[key]

    def _allocate(self, count: int) -> dict[str, np.ndarray]:
        """The batch's arrays as views of one block. One allocation, freed whole, is reused by malloc batch after
        batch; separate megabyte arrays are returned to the system and each batch faulted in afresh (measured: one
        page fault per 4 KiB copied, about half the gather's time)."""
        widths = self._row_widths()
        sizes = [-(-count * width // 64) * 64 for width in widths.values()]
        block, offset, batch = np.empty(sum(sizes), np.uint8), 0, {}
        for (name, width), size in zip(widths.items(), sizes, strict=True):
            spec = self.store.specs[name]
            batch[name] = block[offset : offset + count * width].view(spec.dtype).reshape(count, *spec.row_shape)
            offset += size
        return batch

    def _row_widths(self) -> dict[str, int]:
        """Bytes per row of each output array, worked out once."""
        if self._widths is None:
            specs = {name: self.store.specs[name] for name in self.outputs}
            self._widths = {n: np.dtype(s.dtype).itemsize * int(np.prod(s.row_shape)) for n, s in specs.items()}
        return self._widths

    def close(self) -> None:
        """Close every map (each holds its file's pages mapped, no descriptor), and end the checking process."""
        for views in self._views.values():
            views.clear()
        while self._maps:
            self._maps.popitem()[1].close()
        if self._checks is not None:
            self._checks.close()
            self._checks = None

    def _map(self, name: str, shard: int) -> MappedShard:
        """Shard `shard` of array `name`, mapped; the earliest map is closed when more than `max_maps` are open."""
        key = (name, shard)
        if key in self._maps:
            return self._maps[key]
        mapped = self._maps[key] = self.store.map_shard(name, shard)
        self._mapped_before[shard] = True
        if self._checks is not None:
            mapped.tokens = self._checks.tokens(name, shard)
        identity, verified = self._verified.get(key, (None, None))
        if identity == mapped.identity:  # the same file as when it was last mapped: its checked chunks stay checked
            mapped.verified = verified
        self._verified[key] = (mapped.identity, mapped.verified)
        while len(self._maps) > self.max_maps:
            (closed, closed_shard), old = self._maps.popitem(last=False)
            self._forget(closed, closed_shard)
            old.close()
        return mapped

    def _forget(self, name: str, shard: int) -> None:
        """Drop the row views of a map being closed (they would keep it open)."""
        output = _PLAIN.get(name, name)
        start, stop = self.store.shard_ranges()[shard]
        keys = range(~start, ~stop, -1) if name in _PLAIN else range(start, stop)
        views = self._views[output]
        for key in keys:
            views.pop(key, None)


def _shared_slots(store: FeatureStore, units: list[ReadUnit], names: list[str], count: int) -> dict[str, torch.Tensor]:
    """`count` slots of the largest unit's rows per array, in shared memory, allocated and touched once."""
    rows = max(u.stop - u.start for u in units)
    return {
        name: torch.zeros(
            (count, rows, *store.specs[name].row_shape),
            dtype=torch.from_numpy(np.empty(0, store.specs[name].dtype)).dtype,
        ).share_memory_()
        for name in names
    }


class PreloadedSource:
    """Every complete sample of the named arrays in memory (CPU or GPU), read once with range reads.

    For the features-only mode: SURD's text features (2 x 77 x 768 fp16 + 5120 per sample, about 6 GB for 26k
    samples) fit in one GPU, and then a batch is one `index_select` per array.
    """

    def __init__(self, store: FeatureStore, units: list[ReadUnit], names: list[str], device: torch.device) -> None:
        self.names = names
        self.device = device
        complete = np.concatenate([u.samples for u in units])
        self._slot = np.full(store.num_samples, -1, dtype=np.int64)
        self._slot[complete] = np.arange(len(complete))
        self._tensors = {  # allocated once and filled unit by unit: no second copy at the end
            name: torch.empty(
                (len(complete), *store.specs[name].row_shape),
                dtype=torch.from_numpy(np.empty(0, store.specs[name].dtype)).dtype,
                device=device,
            )
            for name in names
        }
        offset = 0
        for unit in units:
            block = store.read(names, unit.start, unit.stop)
            for name in names:
                rows = torch.from_numpy(block[name][unit.samples - unit.start])
                self._tensors[name][offset : offset + len(rows)].copy_(rows)
            offset += len(unit.samples)

    def fetch(self, indices: np.ndarray, flipped: np.ndarray) -> dict[str, torch.Tensor]:
        slots = _to(torch.from_numpy(self._slot[indices]), self.device)
        rows = {name: self._tensors[name].index_select(0, slots) for name in self.names}
        mask = _to(torch.from_numpy(flipped), self.device)
        for plain, mirrored in _MIRROR.items():
            if mirrored in rows:
                shape = (-1, *[1] * (rows[plain].ndim - 1))
                rows[plain] = torch.where(mask.reshape(shape), rows.pop(mirrored), rows[plain])
        return rows


# ------------------------------------------------------------------------------------------------------ batches


@dataclass
class Batch:
    """One micro-batch on the training device; `generator` (on that device) continues the batch's seeded draws."""

    epoch: int
    index: int
    samples: np.ndarray
    clip_simple: torch.Tensor
    clip_complex: torch.Tensor
    llm: torch.Tensor
    latents: torch.Tensor | None
    generator: torch.Generator
    added_cond: dict[str, torch.Tensor] | None = None  # SDXL: `sdxl_conditioning`


def sample_latents(
    mean: torch.Tensor, logvar: torch.Tensor, scaling_factor: float, generator: torch.Generator
) -> torch.Tensor:
    """`(mean + exp(logvar / 2) * eps) * scaling_factor`, eps ~ N(0, 1) drawn from `generator` (on mean's device)."""
    eps = torch.randn(mean.shape, generator=generator, dtype=torch.float32, device=mean.device)
    # diffusers' DiagonalGaussianDistribution clamps logvar to [-30, 20] before sampling; so do we.
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    return (mean + std * eps) * scaling_factor


@dataclass(frozen=True)
class LoaderSettings:
    batch_size: int
    seed: int
    buffer_units: int = 4
    random_flip: bool = False
    latents: bool = True
    scaling_factor: float = DEFAULT_VAE_SCALING_FACTOR
    rank: int = 0
    world_size: int = 1
    sdxl_target_size: int | None = None  # SDXL stores: the resolution, the time ids' target size


class FeatureLoader:
    """Batches of one process, epoch after epoch, from any `(epoch, batch)` position on."""

    def __init__(
        self, source: FeatureSource, units: list[ReadUnit], settings: LoaderSettings, device: torch.device
    ) -> None:
        self.source, self.units, self.settings, self.device = source, units, settings, torch.device(device)
        self._prepared: tuple[int, int] | None = None  # the position `prepare` planned for, until `batches` starts
        if self.batches_per_epoch(0) < 1:
            raise ValueError(
                f"too few complete samples for one batch: {sum(len(u.samples) for u in units)} samples over "
                f"{settings.world_size} processes, --batch-size {settings.batch_size}; lower --batch-size"
            )

    def batches_per_epoch(self, epoch: int) -> int:
        s = self.settings
        return batches_per_epoch(
            self.units,
            batch_size=s.batch_size,
            seed=s.seed,
            epoch=epoch,
            world_size=s.world_size,
            buffer_units=s.buffer_units,
        )

    def order(self, epoch: int) -> np.ndarray:
        s = self.settings
        return epoch_order(
            self.units, seed=s.seed, epoch=epoch, rank=s.rank, world_size=s.world_size, buffer_units=s.buffer_units
        )

    def prepare(self, epoch: int = 0, start: int = 0) -> None:
        """Start the source's work ahead of the batches from `(epoch, start)` now (reader processes, chunk checks), so
        that it runs while the caller sets up the rest (a training run loads its UNet); `batches` from that position
        goes on from there."""
        self._plan(epoch, start)
        self._prepared = (epoch, start)

    def batches(self, epoch: int = 0, start: int = 0) -> Iterator[Batch]:
        """Yield batches from `(epoch, start)` on, forever; the caller decides when to stop."""
        while True:
            if (epoch, start) != self._prepared:
                self._plan(epoch, start)
            self._prepared = None
            order, count = self.order(epoch), self.batches_per_epoch(epoch)
            size = self.settings.batch_size
            for index in range(start, count):
                yield self._batch(epoch, index, order[index * size : (index + 1) * size])
            epoch, start = epoch + 1, 0

    def _plan(self, epoch: int, start: int) -> None:
        if hasattr(self.source, "plan"):
            size = self.settings.batch_size
            self.source.plan(self.order(epoch)[start * size : self.batches_per_epoch(epoch) * size])

    def close(self) -> None:
        """Release what the source holds open (the store's reader processes, the chunk-checking process)."""
        if hasattr(self.source, "close"):
            self.source.close()

    def _batch(self, epoch: int, index: int, samples: np.ndarray) -> Batch:
        s = self.settings
        flips = batch_generator(s.seed, epoch, index, s.rank, FLIP_STREAM)
        flipped = torch.rand(len(samples), generator=flips) < 0.5
        flipped = flipped.numpy() if s.random_flip else np.zeros(len(samples), dtype=bool)
        features = {name: _to(rows, self.device).float() for name, rows in self.source.fetch(samples, flipped).items()}
        generator = batch_generator(s.seed, epoch, index, s.rank, DRAW_STREAM, self.device)
        latents = added_cond = None
        if s.latents:
            latents = sample_latents(features["latent_mean"], features["latent_logvar"], s.scaling_factor, generator)
            if s.sdxl_target_size is not None:
                added_cond = sdxl_conditioning(features, s.sdxl_target_size)
        return Batch(
            epoch,
            index,
            samples,
            features["clip_simple"],
            features["clip_complex"],
            features["llm"],
            latents,
            generator,
            added_cond,
        )
