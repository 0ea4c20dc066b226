"""The PeRFlow training step: (state, batch, rng) -> (state, metrics), one jitted function.

Frozen text encoding, text dropout to the empty prompt, latents sampled from the stored VAE
moments, the teacher's window solve, the reflow loss, gradients with global-norm clipping,
AdamW, and the EMA with the reference's warm-up (PERFLOW_SPEC.md, "One training example").
The gradient may be accumulated over microbatches, one after another, to save memory (the SDXL
recipe's 8 x 2 per GPU). A LoRA student (``Components.lora``) trains only its adapters on the
frozen teacher's parameters, which stay the teacher's with the adapters off, and keeps no EMA.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from perflow_jax import lora, loss, pipeline, schedule


class TrainState(struct.PyTreeNode):
    """What a checkpoint holds besides the data position: float32 student, optimizer, EMA, step.

    A LoRA student's ``params`` are its adapters (``lora.init_adapters``) and ``ema_params`` is None.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any


@dataclasses.dataclass(frozen=True)
class PeRFlowSettings:
    """The algorithm's settings (static under jit)."""

    parameterization: str = "diff_eps"
    num_windows: int = 4
    solver_steps: int = 8
    teacher_guidance: float = 1.0  # 1: cfg_sync (SD1.5 recipe); 7.5 for SDXL
    teacher_prediction_type: str = "epsilon"
    discrete_timesteps: int = 1000
    text_dropout: float = 0.1
    distance: str = "l2"
    huber_c: float = loss.HUBER_C  # c of the huber distance
    weighting: str = "none"
    zero_snr: bool = False
    ema_max_decay: float = 0.9999


@dataclasses.dataclass(frozen=True, eq=False)
class Components:
    """What the step is built from (static under jit): the student and frozen teacher UNets (the same
    network in their own dtypes), the frozen text encoders, the teacher's noise schedule and the
    VAE's latent scale. ``final_alpha_cumprod``: the alpha of the teacher's last DDIM step to t = 0
    (``pipeline.Model.final_alpha_cumprod()``); None for alphas_cumprod[0]. ``lora``: a LoRA
    student's adapters (its parameters are the teacher's with them merged); None for a full one."""

    student: nn.Module
    teacher: nn.Module
    text: pipeline.TextEncoders
    alphas_cumprod: np.ndarray
    scaling_factor: float
    final_alpha_cumprod: float | None = None
    lora: lora.LoraSpec | None = None


def ema_decay(step: jax.Array, max_decay: float) -> jax.Array:
    """The reference's EMA warm-up (diffusers' EMAModel) at update n = 0, 1, ...: min(max_decay, (1 + n) / (10 + n)).

    Except the first update (n = 0), where the decay is 0: the EMA becomes the student, as EMAModel does.
    """
    n = step.astype(jnp.float32)
    return jnp.where(n == 0, 0.0, jnp.minimum(max_decay, (1.0 + n) / (10.0 + n)))


def make_optimizer(
    learning_rate: float | optax.Schedule,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    grad_clip: float = 1.0,
) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW (the recipes': lr 8e-5, betas (0.9, 0.999), wd 1e-2)."""
    return optax.chain(
        optax.clip_by_global_norm(grad_clip),
        optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay),
    )


def create_train_state(params: Any, optimizer: optax.GradientTransformation, *, ema: bool = True) -> TrainState:
    """A fresh state: the student (float32) starts from ``params`` and the EMA from the same (None without ``ema``)."""
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    step = jnp.zeros((), jnp.int32)
    return TrainState(step=step, params=params, opt_state=optimizer.init(params), ema_params=params if ema else None)


def student_unet(params: Any, frozen: dict[str, Any], components: Components) -> Any:
    """The student's UNet parameters: ``params``, or a LoRA student's adapters merged into the frozen teacher's."""
    if components.lora is None:
        return params
    return lora.merge(frozen["teacher"], params, components.lora.scale)


def draw_examples(
    rng: jax.Array, batch: dict[str, jax.Array], *, components: Components, settings: PeRFlowSettings
) -> dict[str, jax.Array]:
    """The batch with each example's random draws: latent x0, noise eps, time t, text dropout.

    Args:
      rng: the step's key.
      batch: a data.py batch: mean, logvar [B, h, w, c]; input_ids [B, 77] (and for SDXL
        input_ids_2, original_size, crop_top_left).
    Returns:
      the batch's text fields and x0, eps [B, h, w, c] float32 (x0 sampled from the VAE moments and
      scaled), t [B] float32 in (0, 1], drop [B] bool. Drawn for the whole batch at once, so that
      splitting it into microbatches changes no example.
    """
    k_latent, k_eps, k_time, k_drop = jax.random.split(rng, 4)
    batch_size = batch["mean"].shape[0]
    mean, logvar = batch["mean"].astype(jnp.float32), batch["logvar"].astype(jnp.float32)
    x0 = (mean + jnp.exp(0.5 * logvar) * jax.random.normal(k_latent, mean.shape)) * components.scaling_factor
    examples = {k: v for k, v in batch.items() if k not in ("mean", "logvar")}
    examples.update(
        x0=x0,
        eps=jax.random.normal(k_eps, x0.shape),
        t=schedule.sample_times(k_time, batch_size, settings.discrete_timesteps),
        drop=jax.random.uniform(k_drop, (batch_size,)) < settings.text_dropout,
    )
    return examples


def reflow_problem(
    examples: dict[str, jax.Array], frozen: dict[str, Any], *, components: Components, settings: PeRFlowSettings
) -> loss.Reflow:
    """What the student is trained on for ``examples`` (``draw_examples``): frozen text encoding,
    dropout to the empty prompt and the teacher's window solve (``loss.reflow_targets``)."""
    batch_size = examples["x0"].shape[0]
    cond = components.text.encode(frozen, examples)
    null_cond = jax.tree.map(lambda x: jnp.broadcast_to(x, (batch_size,) + x.shape[1:]), frozen["null_cond"])
    return loss.reflow_targets(
        pipeline.unet_apply(components.teacher, frozen["teacher"]),
        examples["x0"],
        examples["eps"],
        examples["t"],
        cond,
        null_cond,
        examples["drop"],
        jnp.asarray(components.alphas_cumprod),
        parameterization=settings.parameterization,
        num_windows=settings.num_windows,
        num_steps=settings.solver_steps,
        guidance=settings.teacher_guidance,
        prediction_type=settings.teacher_prediction_type,
        zero_snr=settings.zero_snr,
        final_alpha=components.final_alpha_cumprod,
    )


def reflow_gradients(
    params: Any,
    examples: dict[str, jax.Array],
    frozen: dict[str, Any],
    *,
    components: Components,
    settings: PeRFlowSettings,
) -> tuple[Any, dict[str, jax.Array]]:
    """Gradients of the reflow loss of ``examples`` (``draw_examples``) for the student ``params``.

    Returns (gradients like params, metrics: loss, window_loss_sum [K], window_count [K]).
    """
    reflow = reflow_problem(examples, frozen, components=components, settings=settings)

    def loss_fn(params):
        unet = student_unet(params, frozen, components)
        prediction = pipeline.unet_apply(components.student, unet)(reflow.z_t, reflow.t * 1000.0, reflow.cond)
        return loss.reflow_loss(
            prediction,
            reflow,
            num_windows=settings.num_windows,
            distance=settings.distance,
            weighting=settings.weighting,
            huber_c=settings.huber_c,
        )

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return grads, metrics


def microbatches(examples: dict[str, jax.Array], n: int) -> dict[str, jax.Array]:
    """[B, ...] -> [n, B / n, ...]: example i goes to microbatch i % n.

    Each device's contiguous slice of the batch splits into n equal parts that stay on that
    device (when n divides the examples per device), so the split moves no data.
    """
    size = jax.tree.leaves(examples)[0].shape[0]
    if size % n:
        raise ValueError(f"a batch of {size} examples does not split into {n} equal microbatches")
    return jax.tree.map(lambda x: x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1), examples)


def accumulated_gradients(
    params: Any,
    examples: dict[str, jax.Array],
    frozen: dict[str, Any],
    *,
    components: Components,
    settings: PeRFlowSettings,
    accumulation_steps: int,
) -> tuple[Any, dict[str, jax.Array]]:
    """``reflow_gradients`` of the whole batch, computed one microbatch at a time (a ``lax.scan``).

    Only one microbatch's activations are alive at a time, beside float32 buffers of the gradient's
    size (bench/RESULTS.md). The microbatches are equal in size, so the batch's mean loss and
    gradient are the means of theirs; the per-window sums add up.
    """
    gradients = functools.partial(reflow_gradients, frozen=frozen, components=components, settings=settings)
    split = microbatches(examples, accumulation_steps)

    def add(total, microbatch):
        grads, metrics = gradients(params, microbatch)
        return jax.tree.map(jnp.add, total, grads), metrics

    grads, metrics = jax.lax.scan(add, jax.tree.map(jnp.zeros_like, params), split)
    grads = jax.tree.map(lambda g: g / accumulation_steps, grads)
    metrics = jax.tree.map(lambda m: m.sum(axis=0), metrics)  # [A, ...] per microbatch -> sums
    return grads, {**metrics, "loss": metrics["loss"] / accumulation_steps}


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    frozen: dict[str, Any],
    *,
    components: Components,
    settings: PeRFlowSettings,
    optimizer: optax.GradientTransformation,
    accumulation_steps: int = 1,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One PeRFlow update.

    Args:
      state: the student (a LoRA student's adapters), optimizer state, EMA and step.
      batch: a data.py batch: mean, logvar [B, h, w, c]; input_ids [B, 77] (and for SDXL
        input_ids_2, original_size, crop_top_left).
      rng: this step's key (fold the step into the run's key outside).
      frozen: {"teacher": UNet params (bfloat16), "text_encoder": ..., ("text_encoder_2": ...),
        "null_cond": the empty prompt's condition for one example (``TextEncoders.encode`` of its ids)}.
      accumulation_steps: compute the gradient in this many microbatches of B / accumulation_steps
        examples, one after another (fewer activations alive at once; the same update up to
        float32 rounding).
    Returns:
      (new state, metrics: loss, window_loss_sum [K], window_count [K], grad_norm).
    """
    examples = draw_examples(rng, batch, components=components, settings=settings)
    gradients = reflow_gradients
    if accumulation_steps > 1:
        gradients = functools.partial(accumulated_gradients, accumulation_steps=accumulation_steps)
    grads, metrics = gradients(state.params, examples, frozen, components=components, settings=settings)
    metrics["grad_norm"] = optax.tree.norm(grads)
    return apply_gradients(state, grads, optimizer=optimizer, settings=settings), metrics


def apply_gradients(
    state: TrainState, grads: Any, *, optimizer: optax.GradientTransformation, settings: PeRFlowSettings
) -> TrainState:
    """The update from the student's gradients: the optimizer (clipping, AdamW), then the EMA (if it has one)."""
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if state.ema_params is None:
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    decay = ema_decay(state.step, settings.ema_max_decay)
    ema_params = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema_params)
