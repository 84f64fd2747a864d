"""The GPU memory plan of extract: the LLM's weights counted on the meta device, and the LLM batch size and the
overlap decision from fake free-memory figures at LLaMA-13B's shapes (hand-computed expectations)."""

from __future__ import annotations

import torch

from sur_cache.choices import LLM_BATCH_SIZE_CAP
from sur_cache.memory_plan import (
    GIB,
    LLMFootprint,
    fits_alongside,
    image_pass_bytes,
    llm_bytes_per_prompt,
    llm_weight_bytes,
    pick_llm_batch_size,
)
from sur_cache.models import load_llm

# LLaMA-13B: 40 layers of width 5120, MLP 13824, 40 heads, vocabulary 32000
LINEAR_13B = 40 * (4 * 5120 * 5120 + 3 * 5120 * 13824)  # q, k, v, o and gate, up, down
OTHER_13B = 32000 * 5120 + (2 * 40 + 1) * 5120  # embeddings, two norms per layer, the final norm
INT8_13B = LINEAR_13B + 2 * OTHER_13B  # 13.0e9 bytes: int8 linear weights, fp16 for the rest
PER_PROMPT_13B = 77 * (16 * (5120 + 13824) + 4 * 40 * 77)  # 24.3 MB at 77 tokens
LLAMA_13B = LLMFootprint(INT8_13B, PER_PROMPT_13B)
SD15_512_B16 = 3 * GIB + 6 * 16 * 128 * 512 * 512 * 2  # 9.0 GiB: weights + the fp16 VAE's first block


def test_the_weights_are_counted_as_bitsandbytes_and_the_dtype_store_them():
    """LLaMA-13B's widths with 2 of its 40 layers (quick to build even on the meta device)."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        hidden_size=5120, intermediate_size=13824, num_attention_heads=40, num_hidden_layers=2, vocab_size=32000
    )
    linear, other = LINEAR_13B // 20, 32000 * 5120 + (2 * 2 + 1) * 5120
    assert llm_weight_bytes(config, load_in_8bit=True, dtype_bytes=2) == linear + 2 * other
    assert llm_weight_bytes(config, load_in_8bit=False, dtype_bytes=2) == 2 * (linear + other)


def test_the_weights_of_a_real_model_are_its_parameters(tiny_models):
    _, model = load_llm(str(tiny_models.llm), load_in_8bit=False, dtype=torch.float32)
    parameters = sum(p.numel() for p in model.parameters())
    assert llm_weight_bytes(model.config, load_in_8bit=False, dtype_bytes=4) == 4 * parameters


def test_the_per_prompt_and_image_pass_formulas():
    assert llm_bytes_per_prompt(5120, 13824, 40, 77) == PER_PROMPT_13B == 24_287_648
    assert image_pass_bytes(16, 512, 2) == SD15_512_B16


def test_the_llm_batch_size_is_the_largest_power_of_two_that_fits_three_quarters_of_the_free_memory():
    # H200, 140 GiB free: far more than 128 prompts fit beside the weights and the image pass -> the cap
    assert pick_llm_batch_size(140 * GIB, LLAMA_13B, SD15_512_B16) == LLM_BATCH_SIZE_CAP == 128
    # 20 GiB free, LLM alone: (0.75 x 20 GiB - 13.0e9) / 24.3e6 = 127.2 prompts -> 64
    assert pick_llm_batch_size(20 * GIB, LLAMA_13B) == 64
    # beside the image pass: (0.75 x 34 GiB - 13.0e9 - 9 GiB) / 24.3e6 = 193.5 -> 128; at 32 GiB 127.2 -> 64
    assert pick_llm_batch_size(34 * GIB, LLAMA_13B, SD15_512_B16) == 128
    assert pick_llm_batch_size(32 * GIB, LLAMA_13B, SD15_512_B16) == 64
    # 16 GiB: the weights alone exceed 0.75 x 16 GiB -> 1 (the load says whether they fit at all)
    assert pick_llm_batch_size(16 * GIB, LLAMA_13B) == 1


def test_the_passes_overlap_only_when_everything_fits_together():
    assert fits_alongside(140 * GIB, LLAMA_13B, 128, SD15_512_B16)
    # 24 GiB: not even one prompt beside the image pass (13.0e9 + 9 GiB > 0.75 x 24 GiB = 19.3e9) -> two passes,
    # the LLM alone taking (19.3e9 - 13.0e9) / 24.3e6 = 259.8 -> 128 prompts
    assert not fits_alongside(24 * GIB, LLAMA_13B, 1, SD15_512_B16)
    assert pick_llm_batch_size(24 * GIB, LLAMA_13B) == 128
    # 32 GiB: 13.0e9 + 64 x 24.3e6 + 9 GiB = 24.2e9 <= 0.75 x 32 GiB = 25.8e9, but not at 128 prompts (27.3e9)
    assert fits_alongside(32 * GIB, LLAMA_13B, 64, SD15_512_B16)
    assert not fits_alongside(32 * GIB, LLAMA_13B, 128, SD15_512_B16)
