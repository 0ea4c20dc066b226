"""Tiny network configs: one home for each, named for what sets it apart.

The UNet, VAE and text encoder configs are diffusers' / transformers' keyword arguments; the
QUICK_ ones are smaller still, for tests that compile the training step's gradient.
"""

from perflow_jax.models.clip import CLIPTextConfig

TINY_UNETS = {
    # SD1.x: integer head count, 1x1-conv projections, cross-attention in the first block.
    "sd1": dict(
        block_out_channels=(32, 64),
        layers_per_block=2,
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ),
    # SD2.x: per-block head counts, linear projections, upcast attention.
    "sd2": dict(
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        cross_attention_dim=24,
        attention_head_dim=(2, 4, 8),
        use_linear_projection=True,
        upcast_attention=True,
        norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    ),
    # SDXL: no attention in the first block, several transformer layers per block, text_time embedding.
    "sdxl": dict(
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        cross_attention_dim=48,
        attention_head_dim=(2, 4, 8),
        transformer_layers_per_block=(1, 2, 3),
        use_linear_projection=True,
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 16,
    ),
}

# SD's VAE layout at toy widths: downsamples by 4.
TINY_VAE = dict(
    block_out_channels=(16, 32, 32),
    layers_per_block=2,
    norm_num_groups=8,
    latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
)

# A CLIP text encoder 32 wide (transformers.CLIPTextConfig's arguments), with the legacy eos_token_id 2.
TINY_TEXT = dict(
    vocab_size=600,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    projection_dim=16,
    eos_token_id=2,
    bos_token_id=0,
    pad_token_id=1,
)

# A CLIP image tower 32 wide on 32 x 32 images in 8 x 8 patches (transformers.CLIPVisionConfig's arguments).
TINY_VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    projection_dim=16,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
)

# One UNet level and an 8-token text encoder 16 wide, so that compiling the training step's
# gradient stays quick on the CPU.
QUICK_UNET = dict(
    block_out_channels=(16,), layers_per_block=1, cross_attention_dim=16, attention_head_dim=2,
    norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
)  # fmt: skip
QUICK_TEXT = CLIPTextConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=8, eos_token_id=2)  # fmt: skip
