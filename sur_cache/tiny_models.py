"""Tiny random-weight stand-ins for Stable Diffusion, an LLM teacher (Llama by default; Mistral, Qwen and Gemma
families too) and a scoring CLIP, built from configs.

The tests and the demo save these with `save_pretrained` and load them back through the same
`from_pretrained` paths a user's real models take, so nothing in the pipeline knows they are tiny.
Widths are deliberately not SD 1.5's (CLIP 32, not 768; LLM 48, not 5120) so no code can assume them.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

TINY_CLIP_WIDTH = 32
TINY_LLM_WIDTH = 48
TINY_LLM_LAYERS = 3
TINY_RESOLUTION = 32  # pixels; the tiny VAE downsamples 4x, so latents are 4 x 8 x 8
# Tiny SDXL: two text encoders of different widths (their sum is the UNet's cross-attention width) and a pooled
# projection of a third width, so no code can swap them unnoticed.
TINY_SDXL_CLIP_WIDTHS = (32, 40)
TINY_SDXL_POOLED_WIDTH = 24
TINY_SDXL_TIME_EMBED_DIM = 8

_CORPUS = [
    "a cat sitting on a red sofa in the afternoon sun",
    "an old man walks his dog along the beach at dawn",
    "portrait of a knight, highly detailed, digital painting, artstation, concept art, sharp focus",
    "a little girl reads a book under a tree while birds sing",
    "cyberpunk city at night, neon lights, rain, cinematic lighting, 8k, trending on artstation",
    "two friends share a pizza and laugh about old times",
    "a castle on a hill, fantasy landscape, matte painting, volumetric light, by greg rutkowski",
]


# The tiny diffusion parts' configs (the CLIP text config also takes the tokenizer's vocabulary and special ids).
TINY_CLIP_CONFIG = dict(
    hidden_size=TINY_CLIP_WIDTH,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
)
TINY_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(8, 16, 16),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=TINY_RESOLUTION,
)
TINY_UNET_CONFIG = dict(
    sample_size=TINY_RESOLUTION // 4,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(16, 32),
    layers_per_block=1,
    cross_attention_dim=TINY_CLIP_WIDTH,
    attention_head_dim=4,
    norm_num_groups=8,
)


TINY_SDXL_UNET_CONFIG = dict(
    TINY_UNET_CONFIG,
    cross_attention_dim=sum(TINY_SDXL_CLIP_WIDTHS),
    addition_embed_type="text_time",
    addition_time_embed_dim=TINY_SDXL_TIME_EMBED_DIM,
    projection_class_embeddings_input_dim=6 * TINY_SDXL_TIME_EMBED_DIM + TINY_SDXL_POOLED_WIDTH,
)


@dataclass(frozen=True)
class TinyModels:
    """Folders of the saved tiny models: `sd` is a diffusers StableDiffusionPipeline folder."""

    sd: Path
    llm: Path


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def save_clip_tokenizer(folder: Path) -> None:
    """A CLIP tokenizer over single byte-level characters: 256 chars, their `</w>` forms, two specials, no merges."""
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    tokenizer.save_pretrained(folder)


def _tiny_tokenizer():
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as scratch:
        save_clip_tokenizer(Path(scratch))
        return CLIPTokenizer.from_pretrained(scratch)


def _tiny_text_config(tokenizer, **overrides):
    from transformers import CLIPTextConfig

    special_ids = dict(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    return CLIPTextConfig(vocab_size=len(tokenizer), **special_ids, **dict(TINY_CLIP_CONFIG, **overrides))


def build_sd_pipeline(folder: Path, seed: int = 0):
    """Save a tiny StableDiffusionPipeline (CLIP text encoder, VAE, UNet, PNDM scheduler) under `folder`."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = _tiny_tokenizer()
    text_encoder = CLIPTextModel(_tiny_text_config(tokenizer))
    vae = AutoencoderKL(**TINY_VAE_CONFIG)
    unet = UNet2DConditionModel(**TINY_UNET_CONFIG)
    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1
    )
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(folder)
    return pipeline


def build_sdxl_pipeline(folder: Path, seed: int = 0):
    """Save a tiny StableDiffusionXLPipeline under `folder`: CLIPTextModel and CLIPTextModelWithProjection (widths
    TINY_SDXL_CLIP_WIDTHS, pooled TINY_SDXL_POOLED_WIDTH), two tokenizers, a `text_time` UNet, a VAE, an Euler
    scheduler, as SDXL base 1.0 ships them (force_zeros_for_empty_prompt, no watermarker)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = _tiny_tokenizer()
    first, second = TINY_SDXL_CLIP_WIDTHS
    pipeline = StableDiffusionXLPipeline(
        vae=AutoencoderKL(**TINY_VAE_CONFIG),
        text_encoder=CLIPTextModel(_tiny_text_config(tokenizer, hidden_size=first)),
        text_encoder_2=CLIPTextModelWithProjection(
            _tiny_text_config(tokenizer, hidden_size=second, projection_dim=TINY_SDXL_POOLED_WIDTH)
        ),
        tokenizer=tokenizer,
        tokenizer_2=_tiny_tokenizer(),
        unet=UNet2DConditionModel(**TINY_SDXL_UNET_CONFIG),
        scheduler=EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
        ),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipeline.save_pretrained(folder)
    return pipeline


def build_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """Save a tiny CLIP (text and vision towers) and its CLIPProcessor under `folder`, as `sur-cache evaluate --clip`
    loads a real one: the byte-level CLIP tokenizer above, TINY_RESOLUTION-pixel images, no resize beyond that."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    torch.manual_seed(seed)
    folder = Path(folder)
    save_clip_tokenizer(folder)
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    special_ids = dict(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    vision = dict(TINY_CLIP_CONFIG, image_size=TINY_RESOLUTION, patch_size=8)
    vision.pop("max_position_embeddings")
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), **special_ids, **TINY_CLIP_CONFIG),
        vision_config=vision,
        projection_dim=16,
    )
    size = dict(shortest_edge=TINY_RESOLUTION)
    crop = dict(height=TINY_RESOLUTION, width=TINY_RESOLUTION)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size=size, crop_size=crop), tokenizer=tokenizer)
    CLIPModel(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


# family -> (config class, causal-LM class, whether its tokenizer puts a BOS first, its chat template or None).
# The BOS and chat-template conventions follow each family's public tokenizer: Llama 2/3, Mistral and Gemma prepend
# a BOS token, Qwen does not; Qwen ships a ChatML template. The tiny Llama keeps no BOS and no template, so the
# other stores built from it in the tests stay as they were.
_CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TINY_LLM_FAMILIES: dict[str, tuple[str, str, bool, str | None]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", False, None),
    "mistral": ("MistralConfig", "MistralForCausalLM", True, None),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", False, _CHATML),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", False, _CHATML),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", True, None),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", True, None),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", True, None),
}


def _llm_tokenizer(adds_bos: bool, chat_template: str | None):
    """A byte-level BPE trained on the fly on _CORPUS (a second, offline), with the family's BOS convention."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<s>", "</s>"] + (["<|im_start|>", "<|im_end|>"] if chat_template else []),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(_CORPUS, trainer=trainer)
    if adds_bos:
        bos = ("<s>", bpe.token_to_id("<s>"))
        bpe.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[bos])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def build_llm(folder: Path, seed: int = 0, family: str = "llama") -> None:
    """Save a tiny causal LM of `family` (a key of TINY_LLM_FAMILIES) and its tokenizer under `folder`.

    Every family gets the same widths (TINY_LLM_WIDTH, TINY_LLM_LAYERS layers, 4 query and 2 key-value heads of 12);
    the family-specific parts (Gemma's scaled embeddings and extra norms, Qwen's biases, sliding windows) are the
    model classes' own.
    """
    import transformers

    config_class, model_class, adds_bos, chat_template = TINY_LLM_FAMILIES[family]
    torch.manual_seed(seed)
    tokenizer = _llm_tokenizer(adds_bos, chat_template)
    config = getattr(transformers, config_class)(
        vocab_size=len(tokenizer),
        hidden_size=TINY_LLM_WIDTH,
        intermediate_size=96,
        num_hidden_layers=TINY_LLM_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=TINY_LLM_WIDTH // 4,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = getattr(transformers, model_class)(config)
    tokenizer.save_pretrained(folder)
    model.save_pretrained(folder)


def build_tiny_models(root: Path, seed: int = 0) -> TinyModels:
    """Build and save both tiny models under `root`; returns their folders."""
    root = Path(root)
    build_sd_pipeline(root / "sd", seed=seed)
    build_llm(root / "llm", seed=seed)
    return TinyModels(sd=root / "sd", llm=root / "llm")


def randomized(module, seed: int = 0):
    """`module` with every parameter drawn at random (std 0.2), so no zero-initialised layer hides a wrong wiring
    in a test that compares two implementations."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return module
