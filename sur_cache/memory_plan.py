"""How extract fits its models in a GPU's free memory, decided before any model loads: whether the LLM runs
alongside CLIP and the VAE (`--overlap` auto) and how many prompts go into one LLM call (`--llm-batch-size auto`).

The estimates are conservative, read from the configs alone (docs/store.md, "Overlap and the LLM batch size"):

    LLM weights   every parameter of the model `load_llm` builds (counted on the meta device): 1 byte per weight of
                  an nn.Linear with LLM.int8 (bitsandbytes quantises every linear layer of the base model), the
                  dtype's bytes for the rest
    per prompt    T x (16 bytes x (width + MLP width) + 4 bytes x heads x T), T the tokenizer length (77): one
                  decoder layer's transient tensors (the forward stops at the wanted layer and keeps no earlier
                  one), with room for LLM.int8's int8 copy of each input and its int32 accumulators, and an fp32
                  attention matrix should SDPA fall back to its math kernel
    image pass    3 GiB for CLIP's and the VAE's weights (SDXL's two text encoders and its VAE take 1.7 GiB in fp16)
                  plus 6 tensors of the VAE's first block, [batch, 128, R, R] in the VAE's dtype

Only HEADROOM of the free memory is planned (the allocator's fragmentation, the DataLoader's pinned buffers, the
CUDA context of a second stream). This module is torch-free arithmetic but for `llm_weight_bytes`.
"""

from __future__ import annotations

from dataclasses import dataclass

from sur_cache.choices import LLM_BATCH_SIZE_CAP

GIB = 2**30
HEADROOM = 0.75  # of the free memory, planned
SD_WEIGHTS_BYTES = 3 * GIB  # CLIP's and the VAE's weights, SDXL's included
VAE_FIRST_BLOCK_CHANNELS = 128  # every SD 1.x/2.x and SDXL VAE's first encoder block
VAE_LIVE_TENSORS = 6  # of that block's size at once: input, norm, activation, conv out, residual, spare


@dataclass(frozen=True)
class LLMFootprint:
    """The LLM's memory: its weights, and what one prompt of the longest length adds to a batch."""

    weight_bytes: int
    bytes_per_prompt: int


def llm_bytes_per_prompt(width: int, mlp_width: int, heads: int, tokens: int) -> int:
    return tokens * (16 * (width + mlp_width) + 4 * heads * tokens)


def image_pass_bytes(batch_size: int, resolution: int, vae_dtype_bytes: int) -> int:
    """CLIP's and the VAE's weights and the VAE's peak activations on one batch (the largest of the image pass)."""
    activations = VAE_LIVE_TENSORS * batch_size * VAE_FIRST_BLOCK_CHANNELS * resolution**2 * vae_dtype_bytes
    return SD_WEIGHTS_BYTES + activations


def pick_llm_batch_size(free_bytes: int, llm: LLMFootprint, reserved_bytes: int = 0) -> int:
    """The largest power of two, at most LLM_BATCH_SIZE_CAP, whose batch fits HEADROOM of `free_bytes` beside the
    LLM's weights and `reserved_bytes` (the image pass when it runs alongside); 1 when none does (the load then
    says whether the weights fit at all)."""
    budget = HEADROOM * free_bytes - llm.weight_bytes - reserved_bytes
    size = LLM_BATCH_SIZE_CAP
    while size > 1 and size * llm.bytes_per_prompt > budget:
        size //= 2
    return size


def fits_alongside(free_bytes: int, llm: LLMFootprint, llm_batch_size: int, image_bytes: int) -> bool:
    """Whether the LLM at `llm_batch_size` and the image pass fit HEADROOM of `free_bytes` together."""
    return llm.weight_bytes + llm_batch_size * llm.bytes_per_prompt + image_bytes <= HEADROOM * free_bytes


def llm_weight_bytes(model_config, *, load_in_8bit: bool, dtype_bytes: int, trust_remote_code: bool = False) -> int:
    """The bytes of the base model (`AutoModel`, as `load_llm` loads it) built from `model_config` on the meta
    device: no weight is allocated or read."""
    import torch
    from transformers import AutoModel

    with torch.device("meta"):
        model = AutoModel.from_config(model_config, trust_remote_code=trust_remote_code)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    total = sum(p.numel() for p in model.parameters())
    return (linear + (total - linear) * dtype_bytes) if load_in_8bit else total * dtype_bytes
