"""What the train-step benchmark's parts share: the benchmarked models, their random batches, the
plan of stages and the sanity check of a step's metrics."""

from __future__ import annotations

import argparse
import dataclasses
import math

import numpy as np

from perflow_jax.models import reference_configs

PARTS = ("jax-sd15", "torch-sd15", "jax-sdxl", "torch-sdxl")
# The student's forward and backward, in UNet forwards.
STUDENT_PASSES = 3


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One benchmarked model: its networks (diffusers / transformers config dicts) and recipe."""

    name: str
    unet: dict
    text_encoders: tuple[dict, ...]  # SDXL: (CLIP ViT-L, OpenCLIP bigG with projection)
    scheduler: dict
    scaling_factor: float
    latent_size: int
    settings: dict  # perflow_jax.step.PeRFlowSettings fields
    learning_rate: float
    flops_per_forward: float | None  # analytic, one UNet forward of one sample at latent_size
    text_len: int = 77

    @property
    def sdxl(self) -> bool:
        return len(self.text_encoders) == 2

    @property
    def teacher_passes(self) -> int:
        """Teacher UNet passes per example and step: S, twice with CFG."""
        return self.settings["solver_steps"] * (1 if self.settings["teacher_guidance"] == 1.0 else 2)


SD15_SCHEDULER = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
SD15 = ModelSpec(
    name="SD1.5",
    unet=reference_configs.SD15_UNET,
    text_encoders=(reference_configs.SD15_TEXT_ENCODER,),
    scheduler=SD15_SCHEDULER,
    scaling_factor=0.18215,
    latent_size=64,
    settings=dict(parameterization="diff_eps", num_windows=4, solver_steps=8, teacher_guidance=1.0),
    learning_rate=8e-5,
    flops_per_forward=803e9,  # SD1.5's UNet at 64x64 latents and 77 tokens, 2 FLOPs per multiply-add
)
SDXL = ModelSpec(
    name="SDXL",
    unet=reference_configs.SDXL_UNET,
    text_encoders=(reference_configs.SD15_TEXT_ENCODER, reference_configs.SDXL_TEXT_ENCODER_2),
    scheduler=SD15_SCHEDULER,  # SDXL base's scheduler has the same scaled_linear betas
    scaling_factor=0.13025,
    latent_size=128,
    settings=dict(
        parameterization="ddim_eps", num_windows=4, solver_steps=10, teacher_guidance=7.5, discrete_timesteps=200
    ),
    learning_rate=1e-4,
    flops_per_forward=6.76e12,  # measured on an H200 (design notes): SDXL's UNet at 1024 px
)
# Tiny stand-ins (tests/test_step.py's one-level UNet; a two-level text_time UNet for SDXL), for
# a CPU run that checks the script, not speed.
_TINY_TEXT = dict(
    vocab_size=100,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=8,
    projection_dim=16,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)
TINY = {
    "sd15": dataclasses.replace(
        SD15,
        name="tiny SD1.x",
        unet=dict(
            block_out_channels=(16,),
            layers_per_block=1,
            cross_attention_dim=16,
            attention_head_dim=2,
            norm_num_groups=8,
            down_block_types=("CrossAttnDownBlock2D",),
            up_block_types=("CrossAttnUpBlock2D",),
        ),
        text_encoders=(_TINY_TEXT,),
        latent_size=8,
        flops_per_forward=None,
        text_len=8,
    ),
    "sdxl": dataclasses.replace(
        SDXL,
        name="tiny SDXL",
        unet=dict(
            block_out_channels=(16, 32),
            layers_per_block=1,
            cross_attention_dim=32,
            attention_head_dim=2,
            transformer_layers_per_block=(1, 2),
            use_linear_projection=True,
            norm_num_groups=8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 16,
        ),
        text_encoders=(_TINY_TEXT, {**_TINY_TEXT, "hidden_act": "gelu"}),
        latent_size=8,
        flops_per_forward=None,
        text_len=8,
    ),
}


def spec_for(part: str, args: argparse.Namespace) -> ModelSpec:
    """The model of a part ("jax-sd15" -> SD15), or its tiny stand-in with ``--tiny``."""
    name = part.split("-")[1]
    return TINY[name] if args.tiny else {"sd15": SD15, "sdxl": SDXL}[name]


def part_plan(part: str, args: argparse.Namespace) -> tuple[list[int], int]:
    """(step batch sizes, largest first; batch of the halves timed alone)."""
    if part.endswith("sdxl"):
        return [args.sdxl_batch], args.sdxl_batch
    return sorted(args.batches, reverse=True), args.alone_batch


def host_batch(spec: ModelSpec, batch_size: int, seed: int) -> dict[str, np.ndarray]:
    """A random data.py batch on the host: mean, logvar [B, s, s, 4] float16, input_ids [B, T] int32
    (+ SDXL's input_ids_2, original_size and crop_top_left [B, 2] int32)."""
    rng = np.random.default_rng(seed)
    size, text_len = spec.latent_size, spec.text_len
    shape = (batch_size, size, size, spec.unet.get("in_channels", 4))
    # VAE latent moments of about unit variance once scaled by the scaling factor.
    batch = {
        "mean": (rng.standard_normal(shape, np.float32) / spec.scaling_factor).astype(np.float16),
        "logvar": rng.uniform(-8.0, -2.0, shape).astype(np.float16),
    }
    for i, name in enumerate(("input_ids", "input_ids_2")[: len(spec.text_encoders)]):
        vocab = spec.text_encoders[i]["vocab_size"]
        bos, eos = vocab - 2, vocab - 1  # CLIP's start / end of text: the vocabulary's last two ids
        words = rng.integers(0, bos, (batch_size, text_len))
        end = rng.integers(1, text_len, (batch_size, 1))  # first end-of-text position
        pos = np.arange(text_len)[None]
        batch[name] = np.where(pos == 0, bos, np.where(pos >= end, eos, words)).astype(np.int32)
    if spec.sdxl:
        batch["original_size"] = np.full((batch_size, 2), 8 * size, np.int32)
        batch["crop_top_left"] = np.zeros((batch_size, 2), np.int32)
    return batch


def null_batch(spec: ModelSpec, batch_size: int) -> dict[str, np.ndarray]:
    """The empty prompt's ids [bos, eos, eos, ...] for each text encoder (+ SDXL's size ids)."""
    out = {}
    for i, name in enumerate(("input_ids", "input_ids_2")[: len(spec.text_encoders)]):
        vocab = spec.text_encoders[i]["vocab_size"]
        ids = np.full((batch_size, spec.text_len), vocab - 1, np.int32)
        ids[:, 0] = vocab - 2
        out[name] = ids
    if spec.sdxl:
        out["original_size"] = np.full((batch_size, 2), 8 * spec.latent_size, np.int32)
        out["crop_top_left"] = np.zeros((batch_size, 2), np.int32)
    return out


def check_metrics(metrics: list[dict], batch_size: int) -> tuple[dict, list[str]]:
    """Loss finite and window counts summing to the batch at every step: (summary, failures)."""
    losses = [float(m["loss"]) for m in metrics]
    counts = [float(np.sum(m["window_count"])) for m in metrics]
    failures = []
    bad = [i for i, value in enumerate(losses) if not math.isfinite(value)]
    if bad:
        failures.append(f"loss not finite at steps {bad} ({[losses[i] for i in bad]})")
    off = [i for i, c in enumerate(counts) if c != batch_size]
    if off:
        failures.append(f"window counts sum to {[counts[i] for i in off]}, not {batch_size}")
    summary = {
        "losses": losses,
        "grad_norms": [float(m["grad_norm"]) for m in metrics],
        "window_counts_last": np.asarray(metrics[-1]["window_count"]).tolist(),
        "loss_finite": not bad,
        "window_counts_sum_to_batch": not off,
    }
    return summary, failures
