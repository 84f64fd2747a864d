"""The defaults and choices the command line needs from modules that import torch or zarr, defined here once.

`sur-cache --help` builds every command's options, and so reads these; kept in a module that imports neither,
it starts in a fraction of a second instead of seconds (issue 14). Each value's owner, named beside it, imports
it from here, and is where it takes effect.
"""

from __future__ import annotations

from typing import Literal

AUTO = "auto"  # devices: the device (and dtype) picked for this process
DEVICE_HELP = (
    "Torch device: auto (this process's accelerator as accelerate assigns it under torchrun or accelerate launch; "
    "for a single process the CUDA device if there is one, else the CPU), cpu, cuda, cuda:1, ..."
)
DTYPE_NAMES = ("float16", "bfloat16", "float32")  # models.DTYPES: the CLI's dtype names, mapped to torch dtypes there
DTYPE_CHOICES = (AUTO, *DTYPE_NAMES)  # devices: auto is float16 on CUDA, float32 elsewhere (slow half on the CPU)

# models.resolve_llm: alias -> (hub id, hidden width)
LLM_ALIASES: dict[str, tuple[str, int]] = {
    "llama-7b": ("huggyllama/llama-7b", 4096),
    "llama-13b": ("huggyllama/llama-13b", 5120),
    "llama-30b": ("huggyllama/llama-30b", 6656),
}
Pooling = Literal["mean", "last"]  # models.encode_llm
CropMode = Literal["center", "random"]  # dataset.preprocess

# store: the layout's choices and defaults (measured in docs/store.md)
COMPRESSIONS = ("none", "zstd", "blosc")
DEFAULT_COMPRESSION = "none"  # fp16 features barely compress
DEFAULT_CHUNK_ROWS = 16  # contiguous shard reads near the best, one random row still cheap
DEFAULT_SHARD_ROWS = 256
