"""Stable Diffusion 1.5's real shapes, for benchmarks that build random-weight models from configs (no download).

The values are those of runwayml/stable-diffusion-v1-5's `text_encoder/config.json` (CLIP ViT-L/14) and
`vae/config.json`; its UNet is `UNet2DConditionModel`'s default with 64 x 64 samples and 768-wide cross-attention.
"""

CLIP_L = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
)
SD15_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)
SD15_UNET = dict(sample_size=64, cross_attention_dim=768)
