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
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")  # compilation: torch.compile's modes
COMPILE_CHOICES = (AUTO, *COMPILE_MODES)  # train --compile; compilation.resolve_compile maps auto
DTYPE_CHOICES = (AUTO, *DTYPE_NAMES)  # devices: auto is float16 on CUDA, float32 elsewhere (slow half on the CPU)

# models.resolve_llm: alias -> (public hub id, hidden size); the hidden size lets a user check an LLM feature file
# before loading. The ids and widths are those of the models' hub pages (config.json `hidden_size`); the Meta and Gemma
# repositories are gated (accept the licence on the hub, then `huggingface-cli login`). docs/models.md lists their
# layer counts.
LLM_ALIASES: dict[str, tuple[str, int]] = {
    "llama-7b": ("huggyllama/llama-7b", 4096),
    "llama-13b": ("huggyllama/llama-13b", 5120),
    "llama-30b": ("huggyllama/llama-30b", 6656),
    "llama2-7b": ("meta-llama/Llama-2-7b-hf", 4096),
    "llama2-13b": ("meta-llama/Llama-2-13b-hf", 5120),
    "llama3-8b": ("meta-llama/Meta-Llama-3-8B", 4096),
    "llama3.1-8b": ("meta-llama/Llama-3.1-8B", 4096),
    "mistral-7b": ("mistralai/Mistral-7B-v0.1", 4096),
    "qwen2-7b": ("Qwen/Qwen2-7B", 3584),
    "qwen2.5-7b": ("Qwen/Qwen2.5-7B", 3584),
    "qwen2.5-14b": ("Qwen/Qwen2.5-14B", 5120),
    "qwen3-8b": ("Qwen/Qwen3-8B", 4096),
    "gemma-7b": ("google/gemma-7b", 3072),
    "gemma2-9b": ("google/gemma-2-9b", 3584),
    "gemma3-1b": ("google/gemma-3-1b-pt", 1152),
}
Pooling = Literal["mean", "last"]  # models.encode_llm
CropMode = Literal["center", "random"]  # dataset.preprocess
SDKind = Literal["sd", "sdxl"]  # models.sd_kind: the SD model families
# models.sd_model_facts: `extract --resolution`'s default per family: SD 1.x/2.x as the reference, SDXL native
DEFAULT_RESOLUTION: dict[str, int] = {"sd": 512, "sdxl": 1024}

# store: the layout's choices and defaults (measured in docs/store.md)
COMPRESSIONS = ("none", "zstd", "blosc")
DEFAULT_COMPRESSION = "none"  # fp16 features barely compress
DEFAULT_CHUNK_ROWS = 16  # contiguous shard reads near the best, one random row still cheap
DEFAULT_SHARD_ROWS = 256

# memory_plan: `extract --llm-batch-size auto` is picked from the GPU's free memory, a power of two up to the cap
# (bitsandbytes' int8 matmul is 2.8x faster per sample at 64 prompts than at 16: docs/store.md); on the CPU it is
# LLM_BATCH_SIZE_CPU
LLM_BATCH_SIZE_CAP = 128
LLM_BATCH_SIZE_CPU = 64
