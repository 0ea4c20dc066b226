"""``python -m perflow_jax.demo.train_teacher``: train the embedded demo teacher on handwritten digits.

    python -m perflow_jax.demo.train_teacher --out DIR [--seed 0] [--vae-steps N] [--unet-steps N]

A tiny Stable Diffusion pipeline trained the way SD models are trained, with diffusers and torch
on the CPU, on the "train" split of ``perflow_jax.demo.digits`` (1198 digits, 32x32 px):
(a) an ``AutoencoderKL`` (3 channels, 4x downsampling: 8x8x4 latents) with an L1 reconstruction
    loss and a small KL term; then its ``scaling_factor`` is set to 1 / std of the training
    latents (posterior samples), as SD's 0.18215 was chosen;
(b) a ``CLIPTextModel`` (2 layers, width 32) over the tiny character-level CLIP tokenizer
    (``perflow_jax.demo.tokenizer``), left at its seeded random initialisation and frozen: the ten
    captions "a handwritten digit zero" ... "nine" and the empty prompt get distinct hidden states,
    which is all the UNet needs (PeRFlow keeps the text encoder frozen too);
(c) a ``UNet2DConditionModel`` (SD1.5's block types, widths 32 and 64, one ResNet per block,
    cross-attention, 8x8 latents) trained with the DDPM epsilon loss on SD's noise schedule (scaled_linear,
    0.00085..0.012, 1000 steps), the caption replaced by "" 10% of the time so that classifier-free
    guidance works, AdamW, and an EMA of the weights (the EMA is what is saved).
The result is a ``StableDiffusionPipeline`` folder (safetensors, DDIM scheduler config) that
diffusers loads with ``from_pretrained`` and this project with ``perflow_jax.pipeline.load_model``.

The committed folder ``perflow_jax/demo/digits_teacher`` is the output of

    python -m perflow_jax.demo.train_teacher --out perflow_jax/demo/digits_teacher --seed 0

which takes about 17.5 min (725 s of CPU time) on 2 CPU cores, with one torch thread so that the
sums run in the same order on every machine. Its final losses are
vae_l1 0.01212, vae_kl 1328, scaling_factor 0.64, unet_eps_mse_running 0.05871 (L1 on pixels in
[-1, 1]; KL summed over a latent; the UNet's epsilon MSE of the trained, not the EMA, weights as a
running mean over about the last 100 steps).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import diffusers
import torch
import transformers
from diffusers.training_utils import EMAModel
from tqdm import tqdm

from perflow_jax import weights
from perflow_jax.demo import digits
from perflow_jax.demo.tokenizer import write_tiny_clip_tokenizer

VAE = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=(16, 32, 32),
    layers_per_block=1,
    norm_num_groups=8,
    latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    sample_size=digits.RESOLUTION,
)
TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    projection_dim=16,
)
UNET = dict(
    sample_size=digits.RESOLUTION // 4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    cross_attention_dim=TEXT["hidden_size"],
    attention_head_dim=4,
    norm_num_groups=8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)
# SD1.5's noise schedule, the one the UNet is trained on (the saved DDIM scheduler adds set_alpha_to_one=False).
SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
    prediction_type="epsilon",
    clip_sample=False,
    steps_offset=1,
)
# On the KL summed over a latent's 256 values, next to the L1 error averaged over 3072 pixels: weak, as
# in SD, so the posterior is narrow (its std about 0.08 where the latents' spread is about 1.6); 1e-4
# collapsed two of the four channels into noise.
KL_WEIGHT = 1e-6
TEXT_DROPOUT = 0.1


def train_vae(pixels: torch.Tensor, steps: int, batch_size: int, generator: torch.Generator):
    """AutoencoderKL trained on ``pixels`` [N, 3, 32, 32] in [-1, 1]; (vae, final losses)."""
    vae = diffusers.AutoencoderKL(**VAE)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps, eta_min=1e-5)
    bar = tqdm(range(steps), desc="vae", dynamic_ncols=True)
    for _ in bar:
        x = pixels[torch.randint(len(pixels), (batch_size,), generator=generator)]
        posterior = vae.encode(x).latent_dist
        x_hat = vae.decode(posterior.sample(generator)).sample
        l1 = (x_hat - x).abs().mean()
        kl = posterior.kl().mean()
        loss = l1 + KL_WEIGHT * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(l1=f"{l1.item():.4f}", kl=f"{kl.item():.1f}")
    return vae.eval(), {"vae_l1": l1.item(), "vae_kl": kl.item()}


@torch.no_grad()
def latent_moments(vae: diffusers.AutoencoderKL, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior (mean, std) [N, 4, 8, 8] of every image."""
    posteriors = [vae.encode(chunk).latent_dist for chunk in pixels.split(256)]
    return torch.cat([p.mean for p in posteriors]), torch.cat([p.std for p in posteriors])


@torch.no_grad()
def prompt_states(tokenizer, text_encoder) -> torch.Tensor:
    """Hidden states [11, 77, 32] of the ten captions (index = digit) and of the empty prompt (index 10)."""
    prompts = [digits.caption(label) for label in range(len(digits.DIGIT_NAMES))] + [""]
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
    return text_encoder(ids.input_ids)[0]


def train_unet(mean, std, labels, states, steps: int, batch_size: int, generator: torch.Generator):
    """UNet2DConditionModel trained with the DDPM epsilon loss; (EMA unet, final loss).

    mean, std: [N, 4, 8, 8] scaled latent posterior moments; labels: [N] digits; states: [11, 77, 32].
    """
    unet = diffusers.UNet2DConditionModel(**UNET)
    scheduler = diffusers.DDPMScheduler(**SCHEDULER)
    ema = EMAModel(unet.parameters(), decay=0.999, use_ema_warmup=True, power=3 / 4)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 200))
    empty = len(states) - 1
    bar = tqdm(range(steps), desc="unet", dynamic_ncols=True)
    average = None
    for _ in bar:
        index = torch.randint(len(labels), (batch_size,), generator=generator)
        x0 = mean[index] + std[index] * torch.randn(mean[index].shape, generator=generator)
        eps = torch.randn(x0.shape, generator=generator)
        t = torch.randint(scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
        z_t = scheduler.add_noise(x0, eps, t)
        prompt = torch.where(torch.rand(batch_size, generator=generator) < TEXT_DROPOUT, empty, labels[index])
        loss = torch.nn.functional.mse_loss(unet(z_t, t, states[prompt]).sample, eps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        ema.step(unet.parameters())
        average = loss.item() if average is None else 0.99 * average + 0.01 * loss.item()
        bar.set_postfix(loss=f"{average:.4f}")
    ema.copy_to(unet.parameters())
    return unet.eval(), {"unet_eps_mse_running": average}


def train_teacher(out: Path, *, seed: int = 0, vae_steps: int = 800, unet_steps: int = 2500) -> dict[str, float]:
    """Train the three networks and save the pipeline to ``out``; returns the final losses and timings."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images, labels = digits.load("train")
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    start, cpu_start = time.perf_counter(), time.process_time()

    vae, losses = train_vae(pixels, vae_steps, 32, generator)
    mean, std = latent_moments(vae, pixels)
    samples = mean + std * torch.randn(mean.shape, generator=generator)
    losses["scaling_factor"] = scaling_factor = float(1.0 / samples.std())
    vae.register_to_config(scaling_factor=scaling_factor)

    with tempfile.TemporaryDirectory() as folder:
        tokenizer = write_tiny_clip_tokenizer(Path(folder))
    text_config = transformers.CLIPTextConfig(
        **TEXT,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    text_encoder = transformers.CLIPTextModel(text_config).eval().requires_grad_(False)
    states = prompt_states(tokenizer, text_encoder)

    unet, unet_losses = train_unet(
        mean * scaling_factor, std * scaling_factor, torch.from_numpy(labels), states, unet_steps, 64, generator
    )
    losses.update(unet_losses, seconds=time.perf_counter() - start, cpu_seconds=time.process_time() - cpu_start)
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=diffusers.DDIMScheduler(**SCHEDULER, set_alpha_to_one=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    return losses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser("python -m perflow_jax.demo.train_teacher", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the diffusers pipeline")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=800, help="autoencoder steps, batch 32")
    parser.add_argument("--unet-steps", type=int, default=2500, help="UNet steps, batch 64")
    args = parser.parse_args(argv)
    # One thread: the same sums in the same order on every machine (and 2 threads on 2 busy cores were slower).
    torch.set_num_threads(1)
    try:
        weights.require_empty(args.out, ValueError, "choose another --out or remove it")
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    losses = train_teacher(args.out, seed=args.seed, vae_steps=args.vae_steps, unet_steps=args.unet_steps)
    print(", ".join(f"{key} {value:.4g}" for key, value in losses.items()) + f" -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
