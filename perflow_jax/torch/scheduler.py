"""PeRFlow's window sampler as a diffusers scheduler (PERFLOW_SPEC.md, "Sampler" and "Parameterizations").

A drop-in for the authors' released ``PeRFlowScheduler`` (same class name, configuration keys and
defaults, so their ``scheduler_config.json`` files load here and ours load there)::

    pipe.unet = UNet2DConditionModel.from_pretrained(EXPORT_DIR)
    pipe.scheduler = PeRFlowScheduler.from_config(pipe.scheduler.config, prediction_type="diff_eps")
    image = pipe(prompt, num_inference_steps=4, guidance_scale=4.5).images[0]

It is the PyTorch twin of ``perflow_jax.sampler`` and computes what that computes, in float32
(times = timestep / 1000, alphas_cumprod as diffusers builds it, int truncation of t * 1000), so
the two agree to float32 rounding (tests/test_torch_scheduler.py). It imports no JAX, so an export
runs where only torch and diffusers are installed. Unlike the release, fewer steps than windows
is an error instead of a silent increase.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_ddim import betas_for_alpha_bar
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin, SchedulerOutput
from diffusers.utils import logging

logger = logging.get_logger(__name__)

NUM_TRAIN_TIMESTEPS = 1000
PREDICTION_TYPES = ("velocity", "ddim_eps", "diff_eps")


class PeRFlowScheduler(SchedulerMixin, ConfigMixin):
    """Euler steps along a PeRFlow student's piecewise-linear flow, K time windows from t = 1 to t = 0.

    Args:
        num_train_timesteps: must be 1000 (the windows and timestep tables assume it, as do all SD models).
        beta_start, beta_end, beta_schedule, trained_betas: the teacher's noise schedule
            (``scaled_linear``, ``linear`` or ``squaredcos_cap_v2``); the eps parameterizations need it.
        set_alpha_to_one: accepted so that released and teacher configs load; it changes nothing, as in
            the release: the last window always ends at alphas_cumprod[0] (the models were trained so).
        prediction_type: what the model outputs: ``velocity``, ``ddim_eps`` or ``diff_eps``
            (released models: SD1.5 ``diff_eps``, SD2.1 ``velocity``, SDXL ``ddim_eps``).
        t_noise, t_clean: the ends of the time range; only the released 1 and 0 are supported.
        num_time_windows: K, the number of windows the model was trained with (4 in all releases).
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas: np.ndarray | list[float] | None = None,
        set_alpha_to_one: bool = False,
        prediction_type: str = "ddim_eps",
        t_noise: float = 1,
        t_clean: float = 0,
        num_time_windows: int = 4,
    ):
        if num_train_timesteps != NUM_TRAIN_TIMESTEPS:
            raise ValueError(
                f"num_train_timesteps={num_train_timesteps}: PeRFlow's windows and timesteps assume "
                f"{NUM_TRAIN_TIMESTEPS} (all Stable Diffusion models use it)"
            )
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type={prediction_type!r} is not a PeRFlow parameterization: choose one of "
                f"{', '.join(PREDICTION_TYPES)} (released models: SD1.5 diff_eps, SD2.1 velocity, SDXL ddim_eps). "
                "From a teacher's scheduler config: PeRFlowScheduler.from_config(config, prediction_type=...)"
            )
        if (t_noise, t_clean) != (1, 0):
            raise ValueError(
                f"t_noise={t_noise}, t_clean={t_clean}: only the released t_noise=1, t_clean=0 are supported"
            )
        if num_time_windows < 1:
            raise ValueError(f"num_time_windows={num_time_windows}: need at least one window (released models: 4)")
        if set_alpha_to_one:
            logger.warning("set_alpha_to_one=True is ignored: PeRFlow's last window ends at alphas_cumprod[0]")

        if trained_betas is not None:
            self.betas = torch.tensor(trained_betas, dtype=torch.float32)
        elif beta_schedule == "scaled_linear":
            self.betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
        elif beta_schedule == "linear":
            self.betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
        elif beta_schedule == "squaredcos_cap_v2":
            self.betas = betas_for_alpha_bar(num_train_timesteps)
        else:
            raise ValueError(
                f"beta_schedule={beta_schedule!r}: supported are scaled_linear, linear, squaredcos_cap_v2, "
                "or trained_betas"
            )
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)  # [1000] float32, on the CPU as diffusers does
        self._ab = self.alphas_cumprod.numpy()
        # Window boundaries i / K, each rounded once to float32: [1, (K-1)/K, ..., 0].
        self._bounds = (np.arange(num_time_windows, -1, -1) / num_time_windows).astype(np.float32)

        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.timesteps = None
        self._step_index = None

    def scale_model_input(self, sample: torch.Tensor, timestep: int | None = None) -> torch.Tensor:
        """The identity: the model sees the flow's z_t as it is."""
        return sample

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """``self.timesteps``: [N] int64, noisiest first; window k gets N // K steps, plus one for the first N % K.

        Inside a window: linspace(t_s, t_e, n, endpoint=False) * 1000, truncated. N = 4, K = 4:
        [1000, 750, 500, 250]; N = 6: [1000, 875, 750, 625, 500, 250].
        """
        num_windows = self.config.num_time_windows
        if num_inference_steps < num_windows:
            raise ValueError(
                f"{num_inference_steps} sampling steps for a model trained with {num_windows} windows: every "
                f"window needs at least one step, so use {num_windows} or more (the authors' scheduler silently "
                f"runs {num_windows})"
            )
        per_window = []
        for k in range(num_windows):
            n = num_inference_steps // num_windows + (1 if k < num_inference_steps % num_windows else 0)
            t_s, t_e = 1.0 * (num_windows - k) / num_windows, 1.0 * (num_windows - k - 1) / num_windows
            per_window.append(np.linspace(t_s, t_e, num=n, endpoint=False))
        timesteps = (np.concatenate(per_window) * NUM_TRAIN_TIMESTEPS).astype(np.int64)
        self.timesteps = torch.from_numpy(timesteps).to(device)
        self.num_inference_steps = num_inference_steps
        self._step_index = None

    def _index_of(self, timestep: int) -> int:
        """The position of ``timestep`` in ``self.timesteps``: the next one when stepping in order, else its first."""
        taus = self.timesteps.tolist()
        if self._step_index is not None and self._step_index < len(taus) and taus[self._step_index] == timestep:
            return self._step_index
        if timestep not in taus:
            raise ValueError(
                f"timestep {timestep} is not one of this scheduler's timesteps {taus}: step through "
                "scheduler.timesteps after set_timesteps(num_inference_steps)"
            )
        return taus.index(timestep)

    def _alpha_at(self, t: np.float32) -> np.float32:
        """alpha at time t: ab[int(t * 1000) - 1] (t * 1000 in float32, truncated), ab[0] where the index is < 0."""
        index = int(np.floor(t * np.float32(NUM_TRAIN_TIMESTEPS))) - 1
        return self._ab[max(index, 0)]

    def _eps_to_velocity_coefficients(self, t: np.float32) -> tuple[np.float32, np.float32, np.float32]:
        """(lambda_t, eta_t, t_e - t): v = (lambda_t z_t + eta_t eps - z_t) / (t_e - t) inside t's window.

        The window k = clip(floor(K (1 - t + 1e-4)), 0, K - 1) holds its start, not its end. With
        a_s, a_e the alphas at its ends (t_s, t_e):
        ddim_eps: lambda_s = sqrt(a_e / a_s), eta_s = sqrt(1 - a_e) - sqrt(a_e (1 - a_s) / a_s);
        diff_eps: gamma = sqrt(a_s / a_e), lambda_s = 1 / gamma, eta_s = -sqrt(1 - gamma^2) / gamma;
        D = lambda_s (t - t_s) + (t_e - t), lambda_t = lambda_s (t_e - t_s) / D, eta_t = eta_s (t_e - t) / D.
        All float32 scalars, in the order of operations of perflow_jax.schedule.
        """
        one = np.float32(1)
        num_windows = self.config.num_time_windows
        k = int(np.floor(np.float32(num_windows) * (one - t + np.float32(1e-4))))
        k = min(max(k, 0), num_windows - 1)
        t_s, t_e = self._bounds[k], self._bounds[k + 1]
        a_s, a_e = self._alpha_at(t_s), self._alpha_at(t_e)
        if self.config.prediction_type == "ddim_eps":
            lambda_s = np.sqrt(a_e / a_s)
            eta_s = np.sqrt(one - a_e) - np.sqrt(a_e * (one - a_s) / a_s)
        else:
            gamma = np.sqrt(a_s / a_e)
            lambda_s = one / gamma
            eta_s = -np.sqrt(one - np.square(gamma)) / gamma
        d = lambda_s * (t - t_s) + (t_e - t)
        return lambda_s * (t_e - t_s) / d, eta_s * (t_e - t) / d, t_e - t

    def step(
        self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor, return_dict: bool = True
    ) -> SchedulerOutput | tuple[torch.Tensor]:
        """One Euler step z <- z + dt v from ``timestep`` to the next one of ``self.timesteps`` (0 after the last).

        model_output, sample: [B, C, H, W] (any shape, any float dtype); timestep: one of
        ``self.timesteps`` (int or a one-element tensor). v is the output itself for ``velocity``,
        else the velocity the eps implies inside the window of ``timestep``; dt = (next - timestep)
        / 1000. Computed in float32; ``prev_sample`` has ``sample``'s dtype.
        """
        if self.timesteps is None:
            raise ValueError("step() before set_timesteps(): call scheduler.set_timesteps(num_inference_steps) first")
        if isinstance(timestep, torch.Tensor):
            if timestep.numel() != 1:
                raise ValueError(
                    f"step() takes one timestep for the whole batch, got a tensor of shape {timestep.shape}"
                )
            timestep = timestep.item()
        tau = int(timestep)
        if tau != timestep:
            raise ValueError(f"timestep {timestep} is not an integer: use one of scheduler.timesteps")
        i = self._index_of(tau)
        tau_next = int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else 0
        dt = np.float32((tau_next - tau) / NUM_TRAIN_TIMESTEPS)

        z = sample.to(torch.float32)
        output = model_output.to(torch.float32)
        if self.config.prediction_type == "velocity":
            v = output
        else:
            t = np.float32(tau) / np.float32(NUM_TRAIN_TIMESTEPS)
            lambda_t, eta_t, t_e_minus_t = self._eps_to_velocity_coefficients(t)
            z_e_hat = float(lambda_t) * z + float(eta_t) * output  # the window's end point the eps implies
            v = (z_e_hat - z) / float(t_e_minus_t)
        prev_sample = (z + float(dt) * v).to(sample.dtype)
        self._step_index = i + 1

        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor | int
    ) -> torch.Tensor:
        """sqrt(a) x + sqrt(1 - a) eps with a = alpha at t = timestep / 1000: ab[timestep - 1], ab[0] for 0.

        original_samples, noise: [B, ...]; timesteps: [B] or a scalar, integers in [0, 1000].
        Computed in float32, returned in ``original_samples``' dtype.
        """
        index = (torch.as_tensor(timesteps, device=self.alphas_cumprod.device).long() - 1).clamp(min=0)
        a = self.alphas_cumprod[index].to(original_samples.device).flatten()
        a = a.reshape(a.shape + (1,) * (original_samples.ndim - a.ndim))
        x, eps = original_samples.to(torch.float32), noise.to(torch.float32)
        return (a.sqrt() * x + (1 - a).sqrt() * eps).to(original_samples.dtype)

    def __len__(self) -> int:
        return self.config.num_train_timesteps
