"""``python -m perflow_jax.demo.train_controlnet``: train the embedded demo ControlNet for the digits teacher.

    python -m perflow_jax.demo.train_controlnet --out DIR [--seed 0] [--steps N]

A ControlNet as diffusers trains one, on the CPU: ``ControlNetModel.from_unet`` of the embedded
teacher's UNet (``perflow_jax.demo.TEACHER``: its down blocks and mid block copied, zero
convolutions, and a conditioning embedding of two stride-2 stages, since the demo's VAE downsamples
by 4, not SD's 8), trained with the teacher's DDPM epsilon loss through the frozen teacher UNet on
the "train" split of ``perflow_jax.demo.digits``, the control image of each digit being its coarse
silhouette (``perflow_jax.demo.control``: where the strokes go, not how they look), given in [0, 1]
as diffusers' ControlNet pipelines give it. The caption is replaced by "" 10% of the time, as in
the teacher's training (classifier-free guidance's unconditional branch). AdamW, no EMA.

The committed folder ``perflow_jax/demo/digits_controlnet`` (a diffusers ``ControlNetModel``
folder: config.json and float32 safetensors, 1.8 MB) is the output of

    python -m perflow_jax.demo.train_controlnet --out perflow_jax/demo/digits_controlnet --seed 0

which took 14 min 18 s (178 s of CPU time: the 2 cores were shared with other jobs) on 2026-12-03,
600 steps of batch 64 with one torch thread; its final running epsilon MSE (about the last 100 steps)
is 0.0470. ``bench/controlnet_quality.py`` measures how well samples follow the control.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import diffusers
import numpy as np
import torch
import transformers
from tqdm import tqdm

from perflow_jax import weights
from perflow_jax.demo import TEACHER, control, digits
from perflow_jax.demo.train_teacher import TEXT_DROPOUT, latent_moments, prompt_states

# Two stride-2 stages: the 32 px control image down to the 8x8 latents (the demo VAE's factor 4).
CONDITIONING_CHANNELS = (16, 32, 32)


def control_tensor(images: np.ndarray) -> torch.Tensor:
    """Digit images [N, 32, 32, 3] uint8 -> their control images [N, 3, 32, 32] float32 in [0, 1]."""
    return torch.from_numpy(control.control_images(images)).permute(0, 3, 1, 2).float() / 255.0


def train_controlnet(
    out: Path, *, seed: int = 0, steps: int = 600, batch_size: int = 64, teacher: Path = TEACHER
) -> dict[str, float]:
    """Train a ControlNet for ``teacher`` and save it to ``out``; returns the final running loss and timings."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    start, cpu_start = time.perf_counter(), time.process_time()
    vae = diffusers.AutoencoderKL.from_pretrained(teacher / "vae").eval()
    unet = diffusers.UNet2DConditionModel.from_pretrained(teacher / "unet").eval().requires_grad_(False)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(teacher / "tokenizer")
    text_encoder = transformers.CLIPTextModel.from_pretrained(teacher / "text_encoder").eval()
    scheduler = diffusers.DDPMScheduler.from_pretrained(teacher / "scheduler")
    states = prompt_states(tokenizer, text_encoder)  # [11, 77, 32]: the ten captions, then ""

    images, labels = digits.load("train")
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    mean, std = (m * vae.config.scaling_factor for m in latent_moments(vae, pixels))
    controls = control_tensor(images)
    labels = torch.from_numpy(labels)

    controlnet = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=CONDITIONING_CHANNELS)
    controlnet.train()
    optimizer = torch.optim.AdamW(controlnet.parameters(), lr=1e-3, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 100))
    empty = len(states) - 1
    average = None
    bar = tqdm(range(steps), desc="controlnet", dynamic_ncols=True)
    for _ in bar:
        index = torch.randint(len(labels), (batch_size,), generator=generator)
        x0 = mean[index] + std[index] * torch.randn(mean[index].shape, generator=generator)
        eps = torch.randn(x0.shape, generator=generator)
        t = torch.randint(scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
        z_t = scheduler.add_noise(x0, eps, t)
        prompt = torch.where(torch.rand(batch_size, generator=generator) < TEXT_DROPOUT, empty, labels[index])
        down, mid = controlnet(z_t, t, states[prompt], controlnet_cond=controls[index], return_dict=False)
        prediction = unet(
            z_t, t, states[prompt], down_block_additional_residuals=down, mid_block_additional_residual=mid
        ).sample
        loss = torch.nn.functional.mse_loss(prediction, eps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(controlnet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        average = loss.item() if average is None else 0.99 * average + 0.01 * loss.item()
        bar.set_postfix(loss=f"{average:.4f}")
    controlnet.eval().save_pretrained(out, safe_serialization=True)
    return {
        "eps_mse_running": average,
        "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu_start,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser("python -m perflow_jax.demo.train_controlnet", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the diffusers ControlNetModel")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=600, help="training steps, batch 64")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # as train_teacher: the same sums in the same order on every machine
    try:
        weights.require_empty(args.out, ValueError, "choose another --out or remove it")
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    results = train_controlnet(args.out, seed=args.seed, steps=args.steps)
    print(", ".join(f"{key} {value:.4g}" for key, value in results.items()) + f" -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
