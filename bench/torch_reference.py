"""The PeRFlow training step in PyTorch, computed as the authors' release computes it.

The reference that ``bench/train_step.py`` times against this project's JAX step, and that
``tests/test_torch_reference.py`` checks for equal math against ``perflow_jax.step.train_step``.
It follows the authors' ``scripts/perflow_accelerate_sd.py`` (SD1.5),
``scripts/perflow_accelerate_ddimeps_sdxl.py`` (SDXL) and ``src/pfode_solver.py``
(magic-research/piecewise-rectified-flow), as docs/PERFLOW_SPEC.md describes them: diffusers
``UNet2DConditionModel`` teacher (frozen) and student (float32 parameters), transformers CLIP text
encoder(s), the teacher's ``DDIMScheduler`` loaded from its scheduler config as the authors load
it (``alphas_cumprod``, ``add_noise``, and ``final_alpha_cumprod``: 1 unless the config says
``set_alpha_to_one: false``), the window solve by DDIM with the teacher's
timesteps ``round(999 + (t_i - 1) / 0.001)``, the target of the parameterization,
``F.mse_loss(pred.float(), target.float())``, ``clip_grad_norm_(1.0)``, ``torch.optim.AdamW`` and
diffusers' ``EMAModel``. On a GPU the step runs under ``torch.autocast(bfloat16)`` with the
teacher and text encoders stored in bfloat16 and the default SDPA attention.

Where this differs from the authors' scripts, without changing the math:
- latents come from stored VAE moments (mean + exp(logvar / 2) n, times the scaling factor), as
  this project's data holds them, instead of a VAE encode of pixels in the step;
- the window lookup, the mask of dropped texts and the solver's alpha lookups are tensor
  operations instead of per-example Python loops (which synchronise with the host);
- the solver's DDIM arithmetic and the latents are float32 (the authors: the latents' dtype,
  bfloat16 / float16 under mixed precision), as in this project;
- the teacher and text encoders also run inside the autocast region (the authors call them in
  their storage dtype outside it: the same bfloat16 matrix products).

Tensors are channels-first, as diffusers wants them: latents ``[B, C, H, W]``.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from diffusers.training_utils import EMAModel

NUM_TRAIN_TIMESTEPS = 1000
PARAMETERIZATIONS = ("velocity", "ddim_eps", "diff_eps")
PREDICTION_TYPES = ("epsilon", "v_prediction")

# The UNet as the solver calls it: (z [B, C, H, W], timesteps [B], cond) -> output [B, C, H, W].
Apply = Callable[[torch.Tensor, torch.Tensor, Mapping[str, torch.Tensor]], torch.Tensor]


class Reflow(NamedTuple):
    """One batch's reflow problem: latents [B, C, H, W] float32, times [B] float32."""

    z_s: torch.Tensor
    z_e: torch.Tensor
    z_t: torch.Tensor
    target: torch.Tensor
    t: torch.Tensor
    window: torch.Tensor  # int64 window index
    t_s: torch.Tensor
    t_e: torch.Tensor
    cond: dict[str, torch.Tensor]  # what the student sees (text dropped where masked)


def unet_apply(unet: torch.nn.Module) -> Apply:
    """A diffusers UNet as ``apply(z, timesteps, cond)``; cond holds encoder_hidden_states (+ SDXL's
    text_embeds and time_ids)."""

    def apply(z, timesteps, cond):
        added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]} if "text_embeds" in cond else None
        return unet(
            z, timesteps, encoder_hidden_states=cond["encoder_hidden_states"], added_cond_kwargs=added,
            return_dict=False,
        )[0]  # fmt: skip

    return apply


def sample_times(u: torch.Tensor, num_discrete: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """t = 1 - floor(u M) / M from u ~ U[0, 1): [B] float32 in (0, 1]."""
    return 1 - (u * num_discrete).floor() / num_discrete


def lookup_window(t: torch.Tensor, num_windows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(window index, t_start, t_end) of each t [B], by the authors' ``Time_Windows.get_window`` rule.

    Window k spans (K - k) / K down to (K - k - 1) / K; t belongs to the first window whose end
    is below t - 1e-4 (the release's ``0.1 * precision`` with precision 1/1000).
    """
    ends = torch.tensor([(num_windows - 1 - k) / num_windows for k in range(num_windows)], device=t.device)
    starts = torch.tensor([(num_windows - k) / num_windows for k in range(num_windows)], device=t.device)
    window = (t[:, None] - 0.1 / NUM_TRAIN_TIMESTEPS <= ends[None, :]).sum(dim=1)
    return window, starts[window], ends[window]


def alpha_index(t: torch.Tensor) -> torch.Tensor:
    """Index into alphas_cumprod of time t: max(int(t * 1000) - 1, 0) (int truncates)."""
    return torch.clamp((t * NUM_TRAIN_TIMESTEPS).long() - 1, min=0)


def solver_timesteps(t_start: torch.Tensor, t_end: torch.Tensor, num_steps: int) -> torch.Tensor:
    """[B, S] int64: round(999 + (t_i - 1) / 0.001), t_i = t_s + i (t_e - t_s) / S, in float32 (PFODESolver)."""
    i = torch.arange(0, num_steps, device=t_start.device).expand(t_start.shape[0], num_steps)
    interval = (t_end[:, None] - t_start[:, None]) / (torch.ones([1], device=t_start.device) * num_steps)
    t_i = t_start[:, None] + interval * i
    step_size = 1 / NUM_TRAIN_TIMESTEPS
    return ((NUM_TRAIN_TIMESTEPS - 1) + (t_i - 1) / step_size).round().long()


def solve(
    teacher: Apply,
    z_s: torch.Tensor,
    t_start: torch.Tensor,
    t_end: torch.Tensor,
    cond: Mapping[str, torch.Tensor],
    null_cond: Mapping[str, torch.Tensor],
    scheduler: DDIMScheduler,
    *,
    num_windows: int,
    num_steps: int,
    guidance: float = 1.0,
    prediction_type: str = "epsilon",
) -> torch.Tensor:
    """The teacher's DDIM (eta = 0) solve of each example's window, z_s at t_s -> z_e at t_e (PFODESolver.solve).

    Each of the S steps jumps from alphas_cumprod[tau] to alphas_cumprod[tau - J], J = 1000 // (K S)
    (the final alpha where that index is negative). With ``guidance`` > 1 the teacher runs once on
    the batch of both halves [null, cond] and combines out_u + w (out_c - out_u).
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown teacher prediction_type {prediction_type!r}: use one of {PREDICTION_TYPES}")
    timesteps = solver_timesteps(t_start, t_end, num_steps)
    jump = NUM_TRAIN_TIMESTEPS // (num_windows * num_steps)
    ab = scheduler.alphas_cumprod.to(z_s.device)
    final = scheduler.final_alpha_cumprod.to(z_s.device)
    if guidance > 1:
        cond = {k: torch.cat([null_cond[k], cond[k]]) for k in cond}
    z = z_s.float()
    with torch.no_grad():
        for i in range(num_steps):
            tau = timesteps[:, i]
            if guidance > 1:
                out_u, out_c = teacher(torch.cat([z, z]), torch.cat([tau, tau]), cond).float().chunk(2)
                out = out_u + guidance * (out_c - out_u)
            else:
                out = teacher(z, tau, cond).float()
            prev = tau - jump
            a = ab[tau][:, None, None, None]
            a_prev = torch.where(prev >= 0, ab[prev.clamp(min=0)], final)[:, None, None, None]
            if prediction_type == "epsilon":
                eps = out
                x0 = (z - (1 - a) ** 0.5 * eps) / a**0.5
            else:
                x0 = a**0.5 * z - (1 - a) ** 0.5 * out
                eps = a**0.5 * out + (1 - a) ** 0.5 * z
            z = a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps
    return z


def target(
    parameterization: str,
    z_s: torch.Tensor,
    z_e: torch.Tensor,
    t_s: torch.Tensor,
    t_e: torch.Tensor,
    a_s: torch.Tensor,
    a_e: torch.Tensor,
) -> torch.Tensor:
    """What the student should output, in the authors' forms.

    velocity: (z_e - z_s) / (t_e - t_s). diff_eps ("noise_matching" with epsilon prediction):
    (z_s - gamma z_e) / sqrt(1 - gamma^2), gamma = sqrt(a_s / a_e). ddim_eps: (z_e - lambda_s z_s) / eta_s,
    lambda_s = sqrt(a_e / a_s), eta_s = sqrt(1 - a_e) - sqrt(a_e (1 - a_s) / a_s).
    """
    t_s, t_e, a_s, a_e = (x[:, None, None, None] for x in (t_s, t_e, a_s, a_e))
    if parameterization == "velocity":
        return (z_e - z_s) / (t_e - t_s)
    if parameterization == "diff_eps":
        gamma = (a_s / a_e) ** 0.5
        return (z_s - gamma * z_e) / (1 - gamma**2) ** 0.5
    if parameterization == "ddim_eps":
        lambda_s = (a_e / a_s) ** 0.5
        eta_s = (1 - a_e) ** 0.5 - (a_e / a_s * (1 - a_s)) ** 0.5
        return (z_e - lambda_s * z_s) / eta_s
    raise ValueError(f"unknown parameterization {parameterization!r}: choose one of {', '.join(PARAMETERIZATIONS)}")


def drop_text(cond: Mapping[str, torch.Tensor], null_cond: Mapping[str, torch.Tensor], drop: torch.Tensor) -> dict:
    """mask * text + (1 - mask) * empty prompt, mask = 0 where ``drop`` [B] bool (the authors' arithmetic).

    SDXL's size ids are not text: they are kept."""
    out = dict(cond)
    for key in ("encoder_hidden_states", "text_embeds"):
        if key in cond:
            c = cond[key]
            mask = (~drop).to(c.dtype).reshape((-1,) + (1,) * (c.dim() - 1))
            out[key] = mask * c + (1 - mask) * null_cond[key]
    return out


def reflow_targets(
    teacher: Apply,
    x0: torch.Tensor,
    eps: torch.Tensor,
    t: torch.Tensor,
    cond: Mapping[str, torch.Tensor],
    null_cond: Mapping[str, torch.Tensor],
    drop: torch.Tensor,
    scheduler: DDIMScheduler,
    *,
    parameterization: str,
    num_windows: int,
    num_steps: int,
    guidance: float = 1.0,
    prediction_type: str = "epsilon",
) -> Reflow:
    """The batch's reflow problem, without gradient.

    Args:
      teacher: the frozen teacher, ``unet_apply(teacher_unet)``.
      x0: [B, C, H, W] latents times the VAE's scaling factor; eps: standard normal noise, same shape.
      t: [B] training times (``sample_times``).
      cond, null_cond: the prompt's and the empty prompt's conditions (batch-first tensors).
      drop: [B] bool, texts replaced by the empty prompt.
      scheduler: the teacher's DDIMScheduler (alphas_cumprod, final alpha, add_noise).
      guidance: 1 is cfg_sync (the teacher sees the student's dropped-out text); above 1 the
        teacher guides the full prompt against the empty one (the SDXL script's 7.5).
    """
    with torch.no_grad():
        window, t_s, t_e = lookup_window(t, num_windows)
        z_s = scheduler.add_noise(x0.float(), eps.float(), alpha_index(t_s))
        student_cond = drop_text(cond, null_cond, drop)
        z_e = solve(
            teacher, z_s, t_s, t_e, student_cond if guidance == 1 else cond, null_cond, scheduler,
            num_windows=num_windows, num_steps=num_steps, guidance=guidance, prediction_type=prediction_type,
        )  # fmt: skip
        z_t = z_s + (z_e - z_s) / (t_e - t_s)[:, None, None, None] * (t - t_s)[:, None, None, None]
        ab = scheduler.alphas_cumprod.to(x0.device)
        a_s, a_e = ab[alpha_index(t_s)], ab[alpha_index(t_e)]
        return Reflow(
            z_s=z_s,
            z_e=z_e,
            z_t=z_t,
            target=target(parameterization, z_s, z_e, t_s, t_e, a_s, a_e),
            t=t,
            window=window,
            t_s=t_s,
            t_e=t_e,
            cond=student_cond,
        )


def reflow_loss(
    prediction: torch.Tensor, reflow: Reflow, num_windows: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, metrics): ``F.mse_loss`` in float32 as the authors; per window k (no gradient) the sum of the
    per-example losses ``window_loss_sum`` [K] and the example count ``window_count`` [K]."""
    loss = F.mse_loss(prediction.float(), reflow.target.float(), reduction="mean")
    with torch.no_grad():
        per_example = ((prediction.float() - reflow.target.float()) ** 2).flatten(1).mean(dim=1)
        one_hot = F.one_hot(reflow.window, num_windows).float()
        metrics = {"loss": loss.detach(), "window_loss_sum": one_hot.T @ per_example, "window_count": one_hot.sum(0)}
    return loss, metrics


class ReferenceStep:
    """One PeRFlow update of the authors' training loop: networks, AdamW, EMA and settings.

    Args:
      student: diffusers UNet2DConditionModel with float32 parameters (trained in place).
      text_encoder: transformers CLIPTextModel (frozen); ``text_encoder_2``: SDXL's
        CLIPTextModelWithProjection, or None.
      scheduler_config: the teacher's diffusers scheduler config (beta schedule, set_alpha_to_one), loaded
        as ``DDIMScheduler.from_config`` (the authors: ``DDIMScheduler.from_pretrained``).
      settings: the algorithm's settings, ``perflow_jax.step.PeRFlowSettings`` (parameterization,
        num_windows, solver_steps, teacher_guidance, teacher_prediction_type, discrete_timesteps,
        text_dropout, ema_max_decay); only the distance "l2" and weighting "none" of the recipes.
      scaling_factor: the VAE's latent scaling factor; resolution: pixels (SDXL's size ids).
      learning_rate: AdamW's (betas (0.9, 0.999), weight decay 1e-2, eps 1e-8, clip 1.0).
      weight_dtype: storage dtype of the frozen teacher (a copy of the student) and text encoders.
      autocast_dtype: the mixed-precision compute dtype (torch.bfloat16 on a GPU), or None.
      gradient_checkpointing: the student recomputes activations in its backward (SDXL script).
    """

    def __init__(
        self,
        student: torch.nn.Module,
        text_encoder: torch.nn.Module,
        text_encoder_2: torch.nn.Module | None,
        scheduler_config: Mapping[str, Any],
        settings: Any,
        *,
        scaling_factor: float,
        resolution: int,
        learning_rate: float,
        weight_dtype: torch.dtype = torch.float32,
        autocast_dtype: torch.dtype | None = None,
        gradient_checkpointing: bool = False,
    ):
        if settings.distance != "l2" or settings.weighting != "none" or settings.zero_snr:
            raise ValueError("the reference implements the recipes' l2 distance, no weighting and no zero_snr only")
        self.settings, self.scaling_factor, self.resolution = settings, scaling_factor, resolution
        self.student = student.train().requires_grad_(True)
        if gradient_checkpointing:
            self.student.enable_gradient_checkpointing()
        self.teacher = _frozen(copy.deepcopy(student), weight_dtype)
        self.text_encoders = [None if e is None else _frozen(e, weight_dtype) for e in (text_encoder, text_encoder_2)]
        self.scheduler = DDIMScheduler.from_config(dict(scheduler_config))
        self.optimizer = torch.optim.AdamW(
            self.student.parameters(), lr=learning_rate, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8
        )
        self.ema = EMAModel(self.student.parameters(), decay=settings.ema_max_decay)
        device = next(student.parameters()).device
        self.ema.to(device)
        self.device, self.autocast_dtype = device, autocast_dtype
        self.teacher_apply, self.student_apply = unet_apply(self.teacher), unet_apply(self.student)

    def compile(self) -> None:
        """From now on run the teacher's and the student's forward through ``torch.compile`` (default mode)."""
        self.teacher_apply = unet_apply(torch.compile(self.teacher))
        self.student_apply = unet_apply(torch.compile(self.student))

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @torch.no_grad()
    def encode_text(self, input_ids: torch.Tensor, input_ids_2: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The UNet's condition: SD1.x/2.x the last hidden state; SDXL both encoders' penultimate hidden
        states side by side, the second's pooled projection and the size ids (resolution, no crop)."""
        first, second = self.text_encoders
        with self.autocast():
            if second is None:
                return {"encoder_hidden_states": first(input_ids)[0]}
            out_1 = first(input_ids, output_hidden_states=True)
            out_2 = second(input_ids_2, output_hidden_states=True)
        size = self.resolution
        time_ids = torch.tensor([[size, size, 0, 0, size, size]], device=input_ids.device).expand(len(input_ids), 6)
        return {
            "encoder_hidden_states": torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1),
            "text_embeds": out_2[0],
            "time_ids": time_ids.to(out_2[0].dtype),
        }

    def draw(self, batch: Mapping[str, torch.Tensor], generator: torch.Generator | None = None):
        """The step's random draws: (x0 [B, C, H, W] from the VAE moments, eps, u [B], drop [B] bool)."""
        mean, logvar = batch["mean"].float(), batch["logvar"].float().clamp(-30.0, 20.0)
        size, device = mean.shape, mean.device
        x0 = mean + torch.exp(0.5 * logvar) * torch.randn(size, device=device, generator=generator)
        eps = torch.randn(size, device=device, generator=generator)
        u = torch.rand(size[0], device=device, generator=generator)
        drop = torch.rand(size[0], device=device, generator=generator) < self.settings.text_dropout
        return x0 * self.scaling_factor, eps, u, drop

    def reflow(self, cond, null_cond, x0, eps, u, drop) -> Reflow:
        """The teacher's part of the step: times, windows, z_s, the window solve, z_t and the target."""
        s = self.settings
        with self.autocast():
            return reflow_targets(
                self.teacher_apply, x0, eps, sample_times(u, s.discrete_timesteps), cond, null_cond, drop,
                self.scheduler, parameterization=s.parameterization, num_windows=s.num_windows,
                num_steps=s.solver_steps, guidance=s.teacher_guidance, prediction_type=s.teacher_prediction_type,
            )  # fmt: skip

    def student_update(self, reflow: Reflow) -> dict[str, torch.Tensor]:
        """The student's part: forward, loss, backward, clip_grad_norm_, AdamW, EMA. Metrics as tensors."""
        with self.autocast():
            prediction = self.student_apply(reflow.z_t, reflow.t.float() * NUM_TRAIN_TIMESTEPS, reflow.cond)
            loss, metrics = reflow_loss(prediction, reflow, self.settings.num_windows)
        loss.backward()
        metrics["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.student.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.step(self.student.parameters())
        return metrics

    def teacher_part(self, batch: Mapping[str, torch.Tensor], null_batch: Mapping[str, torch.Tensor], draws=None):
        """Text encoding (the prompts' and, as the authors do every step, the empty prompt's), the draws and
        ``reflow``: everything before the student. Returns the Reflow."""
        cond = self.encode_text(batch["input_ids"], batch.get("input_ids_2"))
        null_cond = self.encode_text(null_batch["input_ids"], null_batch.get("input_ids_2"))
        x0, eps, u, drop = draws if draws is not None else self.draw(batch)
        return self.reflow(cond, null_cond, x0, eps, u, drop)

    def __call__(self, batch: Mapping[str, torch.Tensor], null_batch: Mapping[str, torch.Tensor], draws=None):
        """One update from a batch (input_ids [B, 77], and input_ids_2 for SDXL; mean, logvar [B, C, H, W]).

        ``null_batch`` holds the empty prompt's ids for the whole batch; ``draws`` = (x0, eps, u, drop)
        replaces the random draws (``draw``) when given. Returns the metrics as tensors.
        """
        return self.student_update(self.teacher_part(batch, null_batch, draws))


def _frozen(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``module`` in eval mode without gradients, stored in ``dtype``."""
    if next(module.parameters()).dtype != dtype:
        module = module.to(dtype)
    return module.eval().requires_grad_(False)
