"""Checking the chunks an epoch will read in a separate process, ahead of the training loop.

The mapped loader checks each chunk's crc32c once per process before it serves a row of it. In the first epoch that
is a second pass over every byte: half of that epoch's time on this project's 2-core VM (docs/store.md). A thread
cannot take it off the loop (google_crc32c holds the GIL for anything but large `bytes`, and through ctypes the GIL
hand-overs cost more than the thread saved: measured), so a small process does it. It maps the same files read-only,
checks the chunks in the order the epoch first needs them, at most `ahead` samples past those the loop has served,
and records each chunk it found intact with the *token* of the file it read (device, inode, size and modification
time, hashed). The loop skips its own check of a chunk only when the token recorded for it is that of the file the
loop has mapped: a file replaced since (the store renames every file into place) has another token and is checked
again. The loop records the chunks it checks itself, which the process then skips, as it skips the samples already
served. The process can only spare checks: a chunk it has not reached, found damaged or could not read is checked by
the loop, which raises with the batch's context. Linux only, as the maps are (memfd).

The shared board is one int64 array in a memfd: slot 0 holds the samples the loop has served, then one slot per
chunk of every array's every shard. The epoch's sample order goes to the process in a second memfd.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import subprocess
import sys
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass

import numpy as np

from sur_cache.shard_files import MappedShard, ShardDamage, ShardLayout, identity_token

WINDOW = 256  # samples whose chunks the process works out at once (vectorised), by default
MEMORY_SHARE = 0.25  # of the memory available at the plan, for the pages checked ahead (a host's processes share it)
MIN_AHEAD = 2048  # samples; what the reader path's ring holds at the default buffer of 4 units of 256 rows
MAPS_HELD = 64  # shard files the process keeps mapped (least recently used closed first)
POLL_SECONDS = 0.005  # how often a waiting process looks at the loop's progress
_SERVED = 0  # the board's slot for the loop's progress
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckedArray:
    """What the process needs of one array: where its shard files are, their layout, and its first board slot."""

    name: str
    path_template: str  # a shard file's path, with `{shard}` for its index
    layout: ShardLayout
    first_slot: int


class ChunkChecks:
    """The loop's side: the board, and one checking process per planned epoch."""

    def __init__(
        self, arrays: list[CheckedArray], shard_rows: int, slots: int, ahead: int, window: int = WINDOW
    ) -> None:
        self.arrays, self.shard_rows, self.ahead, self.window = {a.name: a for a in arrays}, shard_rows, ahead, window
        self._fd = os.memfd_create("sur-cache-chunk-checks")
        os.ftruncate(self._fd, slots * 8)
        self._map = mmap.mmap(self._fd, slots * 8)
        self.board = np.frombuffer(self._map, np.int64)
        self._process: subprocess.Popen | None = None

    def start(self, indices: np.ndarray) -> None:
        """Check, from now on, the chunks `indices` (this epoch's samples, in order) will read (ending any earlier
        epoch's process first)."""
        self.stop()
        self.board[_SERVED] = 0
        plan = os.memfd_create("sur-cache-epoch-order")
        try:
            with open(plan, "wb", closefd=False) as order:
                order.write(np.ascontiguousarray(indices, dtype="<i8").tobytes())
            job = {
                "parent": os.getpid(),
                "shard_rows": self.shard_rows,
                "ahead": self.ahead,
                "window": self.window,
                "arrays": [asdict(a) for a in self.arrays.values()],
            }
            self._process = subprocess.Popen(
                [sys.executable, "-m", "sur_cache.check_ahead", str(self._fd), str(plan)],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                pass_fds=(self._fd, plan),
            )
            self._process.stdin.write(json.dumps(job).encode())
            self._process.stdin.close()
        except OSError as error:  # no process (or one that died at once) costs speed, never a batch: the loop checks
            _log.warning("the chunk-checking process did not start (%s); the loop checks every chunk itself", error)
            self.stop()
        finally:
            os.close(plan)

    def served(self, count: int) -> None:
        """Tell the process how many of the epoch's samples the loop has served."""
        self.board[_SERVED] = count

    def tokens(self, name: str, shard: int) -> np.ndarray:
        """The board's slots of shard `shard` of array `name`, one per chunk (a view the process fills)."""
        array = self.arrays[name]
        first = array.first_slot + shard * array.layout.chunks_per_shard
        return self.board[first : first + array.layout.chunks_per_shard]

    def stop(self) -> None:
        """End the checking process now (it only ever spares checks: nothing is lost)."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None

    def close(self) -> None:
        self.stop()
        self.board = None
        try:
            self._map.close()
        except BufferError:
            pass  # a token view is still alive somewhere; it unmaps when the last one goes
        os.close(self._fd)


def samples_ahead(sample_bytes: int, processes_per_host: int = 1) -> int:
    """How many samples past the loop's the process may check: those whose pages fit in `MEMORY_SHARE` of the memory
    available now (split among the host's training processes), and at least `MIN_AHEAD`.

    Checked pages must still be in the page cache when the loop reads them, or a store the cache does not hold would
    be read from disk twice; within that, further is better: a training run's first epoch is checked while it loads
    its models (about 10 GB/s of crc32c a core here), and on a cold cache the checks read the files in ahead of the
    loop."""
    return max(MIN_AHEAD, int(_available_bytes() * MEMORY_SHARE / max(1, processes_per_host)) // max(1, sample_bytes))


def _available_bytes() -> int:
    """The kernel's estimate of memory available without swapping (`MemAvailable`: free plus reclaimable cache)."""
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def chunks_in_first_use(indices: np.ndarray, shard_rows: int, arrays: list[CheckedArray]) -> list[tuple[int, int, int]]:
    """`(array position, shard, chunk)` of every chunk `indices` read, each once, in the order of first use."""
    shards, rows = np.divmod(indices, shard_rows)
    uses = []  # (first position, array position, shard, chunk)
    for position, array in enumerate(arrays):
        per_shard = array.layout.chunks_per_shard
        keys, first = np.unique(shards * per_shard + rows // array.layout.chunk_rows, return_index=True)
        shard, chunk = np.divmod(keys, per_shard)
        uses += zip(first.tolist(), [position] * len(keys), shard.tolist(), chunk.tolist(), strict=True)
    return [(position, shard, chunk) for _, position, shard, chunk in sorted(uses)]


def _check(board: np.ndarray, plan: np.ndarray, job: dict) -> None:
    """The process's work: every window's chunks, in order, waiting for the loop to come within `ahead`."""
    arrays = [
        CheckedArray(a["name"], a["path_template"], ShardLayout(**a["layout"]), a["first_slot"]) for a in job["arrays"]
    ]
    maps: OrderedDict[tuple[int, int], MappedShard | None] = OrderedDict()
    tokens: dict[tuple[int, int], int | None] = {}  # each file's token, from its stat: no map for what is checked
    window = job["window"]
    for begin in range(0, len(plan), window):
        if begin + window <= board[_SERVED]:
            continue  # the loop has served these samples: their chunks are checked
        waited = False
        for position, shard, chunk in chunks_in_first_use(plan[begin : begin + window], job["shard_rows"], arrays):
            array = arrays[position]
            slot = array.first_slot + shard * array.layout.chunks_per_shard + chunk
            if (position, shard) not in tokens:
                tokens[position, shard] = _token(array.path_template.format(shard=shard))
            if tokens[position, shard] is None or board[slot] == tokens[position, shard]:
                continue  # no file (the loop raises it), or checked (by the loop, or an earlier epoch's process)
            if not waited:  # real work: only within `ahead` of the loop
                if not _wait_for_the_loop(board, begin, job):
                    return
                waited = True
            mapped = _mapped(maps, position, shard, array)
            if mapped is None or mapped.token != tokens[position, shard]:
                continue  # unreadable, or replaced since its stat: left for the loop
            try:
                mapped.check(chunk)
            except ShardDamage:
                continue  # left for the loop, which raises it with the batch's samples
            board[slot] = mapped.token


def _wait_for_the_loop(board: np.ndarray, position: int, job: dict) -> bool:
    """Wait until `position` is at most `ahead` samples past those the loop has served; False if the loop is gone."""
    while position > board[_SERVED] + job["ahead"]:
        if os.getppid() != job["parent"]:
            return False
        time.sleep(POLL_SECONDS)
    return True


def _token(path: str) -> int | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return identity_token((stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns))


def _mapped(maps: OrderedDict, position: int, shard: int, array: CheckedArray) -> MappedShard | None:
    """The shard file's map, kept among the last `MAPS_HELD`; None for a file that is missing or cannot be read."""
    key = (position, shard)
    if key in maps:
        maps.move_to_end(key)
        return maps[key]
    try:
        maps[key] = MappedShard(array.path_template.format(shard=shard), array.layout)
    except (OSError, ShardDamage):
        maps[key] = None
    while len(maps) > MAPS_HELD:
        closed = maps.popitem(last=False)[1]
        if closed is not None:
            closed.close()
    return maps[key]


def main(argv: list[str]) -> None:
    board_fd, plan_fd = int(argv[1]), int(argv[2])
    job = json.loads(sys.stdin.read())
    board = np.frombuffer(mmap.mmap(board_fd, 0), np.int64)
    size = os.fstat(plan_fd).st_size
    plan = np.frombuffer(mmap.mmap(plan_fd, 0, prot=mmap.PROT_READ), "<i8") if size else np.empty(0, np.int64)
    _check(board, plan, job)


if __name__ == "__main__":
    main(sys.argv)
