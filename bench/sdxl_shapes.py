"""Stable Diffusion XL base 1.0's real shapes, for benchmarks that build random-weight models from configs.

The values are those of stabilityai/stable-diffusion-xl-base-1.0's `text_encoder/config.json` (CLIP ViT-L/14),
`text_encoder_2/config.json` (OpenCLIP ViT-bigG/14, with projection), `unet/config.json` and `vae/config.json`.
"""

from sd15_shapes import CLIP_L, SD15_VAE

SDXL_CLIP_L = CLIP_L
SDXL_CLIP_BIG_G = dict(
    vocab_size=49408,
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    max_position_embeddings=77,
    hidden_act="gelu",
    projection_dim=1280,
)
SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # 6 time ids x 256 + the 1280-wide pooled embedding
)
SDXL_VAE = dict(SD15_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
