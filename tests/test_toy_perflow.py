"""A miniature of the paper's claim: PeRFlow at 4 steps samples as well as its teacher at 100 steps,
and much better than the teacher's DDIM at 4 steps.

Data: a 2-D mixture of 8 Gaussians. Teacher: the mixture's exact eps-prediction under SD's noise
schedule. Student: a small MLP distilled with this project's loss (K = 4 windows, S = 8 teacher
steps per window) for each parameterization, then sampled with this project's sampler in 4 steps.
Quality: the sliced Wasserstein distance (SWD) to fresh samples of the mixture. Run with -s for the table.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from perflow_jax import loss, sampler, schedule, solver
from tests.helpers.schedules import sd_alphas

AB = sd_alphas()
NUM_WINDOWS, TEACHER_STEPS = 4, 8  # the SD1.5 recipe's K and S

# 8 equal-weight isotropic Gaussians with means on a circle: the data's scale is that of unit noise.
NUM_MODES, RADIUS, MODE_STD = 8, 1.5, 0.1
ANGLES = 2 * np.pi * np.arange(NUM_MODES) / NUM_MODES
MEANS = jnp.asarray(RADIUS * np.stack([np.cos(ANGLES), np.sin(ANGLES)], axis=1), jnp.float32)  # [8, 2]

NUM_SAMPLES, NUM_PROJECTIONS = 16384, 256
# About 25 s of training per parameterization on 2 CPU cores. Many steps of a small batch at a high
# learning rate did best for the time; 6000 steps were not always enough for ddim_eps (SWD 0.092, seed 2).
TRAIN_STEPS, BATCH, LEARNING_RATE = 8000, 512, 5e-3
SEED = 0


def mixture_samples(key: jax.Array, n: int) -> jax.Array:
    """[n, 2] samples of the mixture."""
    k_mode, k_noise = jax.random.split(key)
    modes = jax.random.randint(k_mode, (n,), 0, NUM_MODES)
    return MEANS[modes] + MODE_STD * jax.random.normal(k_noise, (n, 2))


def teacher(z: jax.Array, timesteps: jax.Array, cond: jax.Array) -> jax.Array:
    """The mixture's exact eps-prediction E[eps | z] at integer ``timesteps`` [B] (as floats); z: [B, 2].

    z = sqrt(a) x0 + sqrt(1 - a) eps is a mixture of N(sqrt(a) mu_k, (a s^2 + 1 - a) I), so
    E[x0 | z] = sum_k r_k(z) [mu_k + sqrt(a) s^2 / (a s^2 + 1 - a) (z - sqrt(a) mu_k)] with
    responsibilities r_k(z), and eps_hat = (z - sqrt(a) E[x0 | z]) / sqrt(1 - a). ``cond`` is unused.
    """
    a = AB[timesteps.astype(jnp.int32)][:, None, None]  # [B, 1, 1]
    var = a * MODE_STD**2 + 1 - a
    offset = z[:, None, :] - jnp.sqrt(a) * MEANS[None]  # [B, 8, 2]
    r = jax.nn.softmax(-jnp.sum(offset**2, axis=-1) / (2 * var[..., 0]), axis=-1)  # equal weights and variances
    x0_k = MEANS[None] + jnp.sqrt(a) * MODE_STD**2 / var * offset
    x0 = jnp.einsum("bk,bkd->bd", r, x0_k)
    return (z - jnp.sqrt(a[:, 0]) * x0) / jnp.sqrt(1 - a[:, 0])


@jax.jit(static_argnames="num_steps")
def teacher_ddim(noise: jax.Array, num_steps: int) -> jax.Array:
    """The teacher's DDIM (eta = 0) from z_1 = ``noise`` [B, 2] in ``num_steps`` steps.

    diffusers' DDIMScheduler with timestep_spacing="trailing" and set_alpha_to_one=False:
    timesteps round(arange(1000, 0, -1000 / N)) - 1 (N = 4: 999, 749, 499, 249), each stepping to
    timestep - 1000 // N, the last one to ab[0]. Trailing spacing starts at the noisiest timestep,
    as PeRFlow's sampler does; SD's default "leading" spacing would start at 751 from pure noise.
    """
    timesteps = np.round(np.arange(1000, 0, -1000 / num_steps)).astype(np.int32) - 1
    prev = timesteps - 1000 // num_steps
    a, a_prev = AB[timesteps], jnp.where(prev >= 0, AB[np.maximum(prev, 0)], AB[0])
    batch = noise.shape[:1]

    def step(z, tau_a_aprev):
        tau, a, a_prev = tau_a_aprev
        eps = teacher(z, jnp.broadcast_to(tau.astype(jnp.float32), batch), None)
        return solver.ddim_step(z, eps, jnp.broadcast_to(a, batch), jnp.broadcast_to(a_prev, batch), "epsilon"), None

    z, _ = jax.lax.scan(step, noise, (jnp.asarray(timesteps), a, a_prev))
    return z


def sliced_wasserstein(key: jax.Array, x: jax.Array, y: jax.Array) -> float:
    """Sliced 2-Wasserstein distance between equal-size samples x, y [n, 2]: the root mean square over
    random unit directions of the 1-D W2 distance of the projections (sorted samples matched in order)."""
    directions = jax.random.normal(key, (2, NUM_PROJECTIONS))
    directions /= jnp.linalg.norm(directions, axis=0)
    px, py = jnp.sort(x @ directions, axis=0), jnp.sort(y @ directions, axis=0)
    return float(jnp.sqrt(jnp.mean((px - py) ** 2)))


def timestep_embedding(timesteps: jax.Array, dim: int = 64) -> jax.Array:
    """Sinusoidal embedding [B, dim] of timesteps [B] in [0, 1000], periods up to 10000 as in SD's UNet."""
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(dim // 2) / (dim // 2))
    angles = timesteps[:, None].astype(jnp.float32) * freqs[None]
    return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


class Student(nn.Module):
    """An MLP (z [B, 2], timesteps [B]) -> [B, 2]: a velocity or an eps, as its parameterization says."""

    width: int = 128
    depth: int = 4

    @nn.compact
    def __call__(self, z: jax.Array, timesteps: jax.Array) -> jax.Array:
        h = jnp.concatenate([z, timestep_embedding(timesteps)], axis=-1)
        for _ in range(self.depth):
            h = nn.silu(nn.Dense(self.width)(h))
        return nn.Dense(2)(h)


def train_student(key: jax.Array, parameterization: str):
    """A Student distilled from the teacher with this project's reflow loss; returns its params."""
    model = Student()
    k_init, k_train = jax.random.split(key)
    params = model.init(k_init, jnp.zeros((1, 2)), jnp.zeros((1,)))
    optimizer = optax.adam(optax.cosine_decay_schedule(LEARNING_RATE, TRAIN_STEPS, alpha=0.01))
    cond = jnp.zeros((BATCH, 1))  # unconditional: a dummy condition, the "empty prompt" alike, never dropped
    no_drop = jnp.zeros((BATCH,), bool)

    @jax.jit
    def train_step(params, opt_state, key):
        k_x0, k_eps, k_t = jax.random.split(key, 3)
        x0 = mixture_samples(k_x0, BATCH)
        eps = jax.random.normal(k_eps, (BATCH, 2))
        t = schedule.sample_times(k_t, BATCH)
        reflow = loss.reflow_targets(
            teacher, x0, eps, t, cond, cond, no_drop, AB,
            parameterization=parameterization, num_windows=NUM_WINDOWS, num_steps=TEACHER_STEPS,
        )  # fmt: skip

        def objective(params):
            prediction = model.apply(params, reflow.z_t, reflow.t * 1000)
            return loss.reflow_loss(prediction, reflow, num_windows=NUM_WINDOWS)[0]

        grads = jax.grad(objective)(params)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state

    opt_state = optimizer.init(params)
    for step_key in jax.random.split(k_train, TRAIN_STEPS):
        params, opt_state = train_step(params, opt_state, step_key)
    return params


@jax.jit(static_argnames=("parameterization", "num_steps"))
def perflow_samples(params, noise: jax.Array, parameterization: str, num_steps: int = 4) -> jax.Array:
    """[n, 2] samples of the student from z_1 = ``noise`` with this project's sampler."""
    cond = jnp.zeros((noise.shape[0], 1))

    def apply(z, timesteps, cond):
        return Student().apply(params, z, timesteps)

    return sampler.sample(
        apply, noise, cond, cond, AB, num_steps=num_steps, num_windows=NUM_WINDOWS, parameterization=parameterization
    )


def evaluation(seed: int) -> dict:
    """Fixed draws for one seed: the true sample all SWDs compare with, the sampling noise, the keys."""
    k_true, k_floor, k_noise, k_projections, k_train = jax.random.split(jax.random.key(seed), 5)
    return {
        "true": mixture_samples(k_true, NUM_SAMPLES),
        "second_true": mixture_samples(k_floor, NUM_SAMPLES),
        "noise": jax.random.normal(k_noise, (NUM_SAMPLES, 2)),
        "projections": k_projections,
        "train": k_train,
    }


def baseline_swd(data: dict) -> dict[str, float]:
    """SWD of a second true sample (the noise floor) and of the teacher's DDIM at 4 and 100 steps."""
    return {
        "noise floor": sliced_wasserstein(data["projections"], data["true"], data["second_true"]),
        "DDIM 4": sliced_wasserstein(data["projections"], data["true"], teacher_ddim(data["noise"], 4)),
        "DDIM 100": sliced_wasserstein(data["projections"], data["true"], teacher_ddim(data["noise"], 100)),
    }


def perflow_swd(data: dict, parameterization: str) -> float:
    """SWD of PeRFlow at 4 steps, the student trained for ``parameterization`` from the seed's training key."""
    key = jax.random.fold_in(data["train"], schedule.PARAMETERIZATIONS.index(parameterization))
    samples = perflow_samples(train_student(key, parameterization), data["noise"], parameterization)
    return sliced_wasserstein(data["projections"], data["true"], samples)


@pytest.fixture(scope="module")
def table():
    """Rows (method, steps, SWD), printed when the module's tests are done."""
    rows = []
    yield rows
    print("\n" + "\n".join(f"{method:<22} {steps:>5} {swd:8.4f}" for method, steps, swd in rows))


@pytest.fixture(scope="module")
def data():
    return evaluation(SEED)


@pytest.fixture(scope="module")
def baseline(data, table):
    swd = baseline_swd(data)
    table.extend(
        [
            ("second true sample", "-", swd["noise floor"]),
            ("teacher DDIM", 4, swd["DDIM 4"]),
            ("teacher DDIM", 100, swd["DDIM 100"]),
        ]
    )
    return swd


@pytest.fixture(scope="module", params=schedule.PARAMETERIZATIONS)
def perflow(request, data, table):
    swd = perflow_swd(data, request.param)
    table.append((f"PeRFlow {request.param}", 4, swd))
    return swd


# Measured (SWD, NUM_SAMPLES = 16384, TRAIN_STEPS = 8000) for seeds 0 / 1 / 2:
#   second true sample (noise floor)  0.048 / 0.028 / 0.042
#   teacher DDIM 4                    0.204 / 0.207 / 0.204
#   teacher DDIM 100                  0.048 / 0.031 / 0.042
#   PeRFlow velocity 4                0.040 / 0.034 / 0.042
#   PeRFlow ddim_eps 4                0.049 / 0.048 / 0.059
#   PeRFlow diff_eps 4                0.057 / 0.049 / 0.053
# Seeds 3 and 4 fall inside the ranges quoted below.
# The noise floor moves with the seed (mostly the mode counts of the two finite samples), so the
# margins are relative to the teacher's own numbers on the same true sample and the same noise.


def test_teacher_ddim_needs_many_steps(baseline):
    # Without this gap the comparisons below would say nothing: DDIM 4 / DDIM 100 measured 4.2-6.7.
    assert baseline["DDIM 4"] > 2.5 * baseline["DDIM 100"]
    # DDIM 100 at the noise floor (measured 0.85-1.11 of it) checks the closed-form teacher.
    assert baseline["DDIM 100"] < 1.5 * baseline["noise floor"]


def test_perflow_4_steps_beats_teacher_ddim_4_steps(baseline, perflow):
    # PeRFlow 4 / DDIM 4 measured 0.17-0.29 (seeds 0-4). An undertrained student fails this: a 3 x 256 MLP
    # after 3000 steps of batch 1024 at lr 1e-3 gave 0.8 for the eps parameterizations.
    assert perflow < 0.5 * baseline["DDIM 4"]


def test_perflow_4_steps_is_as_good_as_teacher_ddim_100_steps(baseline, perflow):
    # PeRFlow 4 closes most of the gap from DDIM 4 down to DDIM 100: the part left measured at most
    # 0.11 of it over seeds 0-4 (seed 1, diff_eps: 0.049 against 0.031, the gap 0.176); a quarter is allowed.
    gap = baseline["DDIM 4"] - baseline["DDIM 100"]
    assert perflow < baseline["DDIM 100"] + 0.25 * gap
