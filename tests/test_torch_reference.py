"""bench/torch_reference.py (the authors' PeRFlow step in PyTorch) computes what perflow_jax's step computes.

A tiny SD1.x UNet and CLIP text encoder with the same random weights on both sides (PyTorch's,
converted with perflow_jax.weights), float32 on the CPU, the same draws (latents, noise, times,
dropped texts: the ones ``step.train_step`` makes from its key), K=4, S=8, cfg_sync, diff_eps.

Measured relative errors (||jax - torch|| / ||torch||, jax 0.10.2 and torch 2.13 on this project's
CPU machine): z_s 7e-8, z_e 2.4e-7, z_t 2e-7, target 1.1e-6, loss 9e-8, per-window loss sums 8e-7,
gradient norm 1e-6, AdamW's first moments (0.1 x the clipped gradients) 3e-6. The tolerances below
are about 10x those: float32 sums in another order (convolutions, attention, the 8-step solve)
and nothing more; a wrong formula, index or coefficient shows at 1e-3 or more. SD_SCHEDULER has no
set_alpha_to_one, so both sides end the last window's solve at alpha 1 (DDIM's default); with
ab[0] there on the JAX side alone, z_e differs by 2.0e-3, the targets by 2.9e-2 and the gradient
norm by 4.9e-2.
"""

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers

from bench import torch_reference
from perflow_jax import loss, pipeline, solver, step, weights
from perflow_jax.models.clip import CLIPTextConfig, CLIPTextModel
from perflow_jax.models.unet import UNet2DConditionModel, UNetConfig
from perflow_jax.schedule import alphas_cumprod_from_config, final_alpha_from_config
from tests.helpers.networks import TINY_TEXT, TINY_UNETS
from tests.helpers.parity import nhwc_to_nchw, random_module, relative_error, torch_state_dict
from tests.helpers.schedules import SD_SCHEDULER

# SD_SCHEDULER has no set_alpha_to_one key, as a DDPMScheduler's config (tests/helpers/pipelines.py): the
# authors' DDIMScheduler then ends the last window's solve at alpha 1.
SCALING_FACTOR = 0.18215
# The tiny SD1.x UNet, one ResNet per level so that compiling the step's gradient stays quick.
UNET = {**TINY_UNETS["sd1"], "layers_per_block": 1}
BATCH, SIZE, TEXT_LEN = 8, 8, 77
LR = 8e-5  # the SD1.5 recipe's
# Dropout 0.5 instead of the recipe's 0.1, so that the batch of 8 has dropped and kept texts.
SETTINGS = step.PeRFlowSettings(text_dropout=0.5)
SEED = 3  # a key whose draws put examples in every window and drop some texts (checked below)

STATE_TOL = 1e-6  # z_s: a few float32 operations
SOLVE_TOL = 1e-5  # z_e, target: eight teacher passes
LOSS_TOL = 2e-5  # loss, window sums, gradient norm
GRAD_TOL = 5e-5  # gradients through the student's backward


def jax_draws(rng, batch):
    """x0, eps, t, drop exactly as step.train_step draws them from its key."""
    k_latent, k_eps, k_time, k_drop = jax.random.split(rng, 4)
    mean, logvar = batch["mean"].astype(jnp.float32), batch["logvar"].astype(jnp.float32)
    x0 = (mean + jnp.exp(0.5 * logvar) * jax.random.normal(k_latent, mean.shape)) * SCALING_FACTOR
    eps = jax.random.normal(k_eps, x0.shape)
    u = jax.random.uniform(k_time, (mean.shape[0],), jnp.float32)
    drop = jax.random.uniform(k_drop, (mean.shape[0],)) < SETTINGS.text_dropout
    return x0, eps, u, drop


@pytest.fixture(scope="module")
def both():
    """One update on each side from the same weights and draws: {"jax": ..., "torch": ...}."""
    unet_torch = random_module(lambda: diffusers.UNet2DConditionModel(**UNET), seed=0)
    text_torch = random_module(lambda: transformers.CLIPTextModel(transformers.CLIPTextConfig(**TINY_TEXT)), seed=1)
    unet = UNet2DConditionModel(UNetConfig.from_dict(dict(unet_torch.config)))
    text = CLIPTextModel(CLIPTextConfig.from_dict(TINY_TEXT))
    params = weights.state_dict_to_params(torch_state_dict(unet_torch), unet.abstract_params(), name="unet")
    text_params = weights.state_dict_to_params(torch_state_dict(text_torch), text.abstract_params(), name="text")

    rng = np.random.default_rng(0)
    ids = rng.integers(3, TINY_TEXT["vocab_size"] - 1, (BATCH, TEXT_LEN)).astype(np.int32)
    ids[:, 0], ids[:, -1] = TINY_TEXT["bos_token_id"], TINY_TEXT["eos_token_id"]
    null_ids = np.full((BATCH, TEXT_LEN), TINY_TEXT["eos_token_id"], np.int32)
    null_ids[:, 0] = TINY_TEXT["bos_token_id"]
    batch = {
        "mean": rng.standard_normal((BATCH, SIZE, SIZE, 4)).astype(np.float16),
        "logvar": np.full((BATCH, SIZE, SIZE, 4), -4.0, np.float16),
        "input_ids": ids,
    }

    # JAX: the step, and the reflow problem it solves (the same function the step calls).
    components = step.Components(
        student=unet,
        teacher=unet,
        text=pipeline.TextEncoders(text, resolution=8 * SIZE),
        alphas_cumprod=alphas_cumprod_from_config(SD_SCHEDULER),
        scaling_factor=SCALING_FACTOR,
        final_alpha_cumprod=final_alpha_from_config(SD_SCHEDULER),
    )
    optimizer = step.make_optimizer(LR)

    @jax.jit
    def run(params, text_params, batch, null_ids, rng):
        frozen = {"teacher": params, "text_encoder": text_params}
        frozen["null_cond"] = components.text.encode(frozen, {"input_ids": null_ids[:1]})
        state = step.create_train_state(params, optimizer)
        new_state, metrics = step.train_step(
            state, batch, rng, frozen, components=components, settings=SETTINGS, optimizer=optimizer
        )
        x0, eps, u, drop = jax_draws(rng, batch)
        t = 1.0 - jnp.floor(u * SETTINGS.discrete_timesteps) / SETTINGS.discrete_timesteps
        cond = components.text.encode(frozen, batch)
        null_cond = jax.tree.map(lambda x: jnp.broadcast_to(x, (BATCH,) + x.shape[1:]), frozen["null_cond"])
        reflow = loss.reflow_targets(
            pipeline.unet_apply(unet, frozen["teacher"]), x0, eps, t, cond, null_cond, drop,
            jnp.asarray(components.alphas_cumprod), parameterization=SETTINGS.parameterization,
            num_windows=SETTINGS.num_windows, num_steps=SETTINGS.solver_steps,
            final_alpha=components.final_alpha_cumprod,
        )  # fmt: skip
        return new_state, metrics, (x0, eps, u, drop), reflow

    new_state, metrics, draws, reflow = jax.tree.map(
        np.array, run(params, text_params, batch, null_ids, jax.random.key(SEED))
    )
    x0, eps, u, drop = draws
    assert set(reflow.window.tolist()) == {0, 1, 2, 3} and 0 < drop.sum() < BATCH, "pick another SEED"

    # PyTorch: the reference from the same weights and draws.
    ref = torch_reference.ReferenceStep(
        unet_torch, text_torch, None, SD_SCHEDULER, SETTINGS, scaling_factor=SCALING_FACTOR, resolution=8 * SIZE,
        learning_rate=LR,
    )  # fmt: skip
    torch_batch = {"input_ids": torch.from_numpy(ids).long()}
    null_batch = {"input_ids": torch.from_numpy(null_ids).long()}
    torch_draws = (
        torch.from_numpy(nhwc_to_nchw(x0)), torch.from_numpy(nhwc_to_nchw(eps)), torch.from_numpy(u),
        torch.from_numpy(drop),
    )  # fmt: skip
    cond, null_cond = ref.encode_text(torch_batch["input_ids"]), ref.encode_text(null_batch["input_ids"])
    torch_reflow = ref.reflow(cond, null_cond, *torch_draws)
    torch_metrics = ref(torch_batch, null_batch, draws=torch_draws)
    adam = {name: ref.optimizer.state[p]["exp_avg"] for name, p in ref.student.named_parameters()}
    return {
        "jax": {
            "reflow": reflow,
            "metrics": metrics,
            "params": weights.params_to_state_dict(new_state.params),
            "mu": weights.params_to_state_dict(optax.tree_utils.tree_get(new_state.opt_state, "mu")),
        },
        "torch": {
            "reflow": torch_reflow,
            "metrics": {k: v.numpy() for k, v in torch_metrics.items()},
            "params": torch_state_dict(ref.student),
            "mu": {k: v.numpy() for k, v in adam.items()},
        },
        "params_before": weights.params_to_state_dict(params),
    }


def test_window_start_points_agree(both):
    err = relative_error(nhwc_to_nchw(both["jax"]["reflow"].z_s), both["torch"]["reflow"].z_s)
    print(f"z_s: relative error {err:.1e}")
    assert err < STATE_TOL


def test_teacher_window_ends_agree(both):
    err = relative_error(nhwc_to_nchw(both["jax"]["reflow"].z_e), both["torch"]["reflow"].z_e)
    print(f"z_e: relative error {err:.1e}")
    assert err < SOLVE_TOL


def test_points_on_the_segment_agree(both):
    err = relative_error(nhwc_to_nchw(both["jax"]["reflow"].z_t), both["torch"]["reflow"].z_t)
    print(f"z_t: relative error {err:.1e}")
    assert err < SOLVE_TOL


def test_diff_eps_targets_agree(both):
    err = relative_error(nhwc_to_nchw(both["jax"]["reflow"].target), both["torch"]["reflow"].target)
    print(f"target: relative error {err:.1e}")
    assert err < SOLVE_TOL


@pytest.mark.parametrize("set_alpha_to_one", [None, True, False], ids=["key-missing", "true", "false"])
def test_window_solve_ends_at_the_final_alpha_of_the_teachers_scheduler_config(set_alpha_to_one):
    """The authors' solver (the reference's ``solve``, DDIMScheduler.from_config) and solver.solve_window
    with ``final_alpha_from_config`` agree for every form of the teacher's config, on a toy teacher.

    Measured: 3.2e-7 or less. With ab[0] as the final alpha whatever the config (this project
    before issue 17), the last window's end differed by 2.6e-3 here where the config lacks the key
    or says true (1.3e-2 through a tiny random UNet).
    """
    config = dict(SD_SCHEDULER) if set_alpha_to_one is None else {**SD_SCHEDULER, "set_alpha_to_one": set_alpha_to_one}
    scheduler = diffusers.DDIMScheduler.from_config(config)
    z_s = np.random.default_rng(0).standard_normal((4, 4, 3, 3)).astype(np.float32)
    t_s, t_e = np.array([1.0, 0.75, 0.5, 0.25], np.float32), np.array([0.75, 0.5, 0.25, 0.0], np.float32)

    def teacher(z, timesteps, cond):  # eps depending on z and the timestep, on both sides
        return 0.1 * z + timesteps.reshape(-1, 1, 1, 1) * 1e-3

    expected = torch_reference.solve(
        teacher, torch.from_numpy(z_s), torch.from_numpy(t_s), torch.from_numpy(t_e), {}, {}, scheduler,
        num_windows=4, num_steps=8,
    ).numpy()  # fmt: skip
    z_e = solver.solve_window(
        teacher, jnp.asarray(z_s), jnp.arange(4), None, None, alphas_cumprod_from_config(config),
        num_windows=4, num_steps=8, final_alpha=final_alpha_from_config(config),
    )  # fmt: skip
    errors = [relative_error(np.asarray(z_e)[k], expected[k]) for k in range(4)]
    print("z_e per window: relative errors " + ", ".join(f"{e:.1e}" for e in errors))
    assert max(errors) < STATE_TOL  # eight steps of a few float32 operations


def test_windows_and_times_agree(both):
    jax_reflow, torch_reflow = both["jax"]["reflow"], both["torch"]["reflow"]
    np.testing.assert_array_equal(jax_reflow.window, torch_reflow.window.numpy())
    for name in ("t_s", "t_e"):
        np.testing.assert_array_equal(getattr(jax_reflow, name), getattr(torch_reflow, name).numpy(), err_msg=name)
    # t = 1 - floor(u M) / M: XLA turns the division by M into a product with float32(1 / M), so t
    # may differ by one float32 rounding (at most 6e-8 below 1) from PyTorch's true division.
    np.testing.assert_allclose(jax_reflow.t, torch_reflow.t.numpy(), rtol=0, atol=6e-8)


def test_loss_and_per_window_sums_agree(both):
    jax_metrics, torch_metrics = both["jax"]["metrics"], both["torch"]["metrics"]
    errors = {k: relative_error(jax_metrics[k], torch_metrics[k]) for k in ("loss", "window_loss_sum", "grad_norm")}
    print("relative errors: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    assert max(errors.values()) < LOSS_TOL
    np.testing.assert_array_equal(jax_metrics["window_count"], torch_metrics["window_count"])


def test_clipped_gradients_agree(both):
    """AdamW's first moment after one update is 0.1 x the clipped gradient on both sides."""
    jax_mu, torch_mu = both["jax"]["mu"], both["torch"]["mu"]
    assert jax_mu.keys() == torch_mu.keys()
    flat = [np.concatenate([m[k].ravel() for k in sorted(jax_mu)]) for m in (jax_mu, torch_mu)]
    err = relative_error(*flat)
    print(f"AdamW first moments: relative error {err:.1e}")
    assert err < GRAD_TOL


def test_updated_parameters_agree(both):
    """One AdamW step moves each weight by about lr sign(g) (plus the decay lr wd w): the same on both sides.

    The first step's move is lr m / (sqrt(v) + 1e-8) = lr g / (|g| + 1e-8): it depends on the sign of
    the clipped gradient g alone, unless |g| is within a few 1e-8 of zero, where a float32 rounding
    of g changes the move by a fraction of lr. The two sides also round w - move in another order
    (PyTorch decays w first), one float32 ulp of w (1.2e-7 for the norm scales near 1). So: every
    weight with |g| above 1e-6 (100 x Adam's eps) agrees to 1e-3 lr plus two ulps of w, and 99.9 %
    of all weights to 1e-3 lr.
    """
    before, jax_params, torch_params = both["params_before"], both["jax"]["params"], both["torch"]["params"]
    assert jax_params.keys() == torch_params.keys()
    keys = sorted(jax_params)
    diffs = np.concatenate([np.abs(jax_params[k] - torch_params[k]).ravel() for k in keys])
    moved = np.concatenate([np.abs(torch_params[k] - before[k]).ravel() for k in keys])
    gradient = np.concatenate([10 * np.abs(both["torch"]["mu"][k]).ravel() for k in keys])
    ulp = np.concatenate([np.spacing(np.abs(before[k])).ravel() for k in keys])
    clear = gradient > 1e-6
    q999 = float(np.quantile(diffs, 0.999))
    print(f"parameters: median move {np.median(moved):.1e} (lr {LR:.0e}); difference: 99.9th percentile "
          f"{q999:.1e}, largest where |g| > 1e-6 ({clear.mean():.1%} of weights) {diffs[clear].max():.1e}, "
          f"largest overall {diffs.max():.1e}")  # fmt: skip
    assert 0.5 * LR < np.median(moved) < 1.5 * LR
    assert q999 < 1e-3 * LR
    assert np.all(diffs[clear] <= 1e-3 * LR + 2 * ulp[clear])


def test_ema_warm_up_matches_diffusers():
    """The reference's EMA (diffusers' EMAModel) and step.ema_decay give the same decay at every update.

    Update 1 uses decay 0 in both (the EMA becomes the student).
    """
    ema = diffusers.training_utils.EMAModel([torch.nn.Parameter(torch.zeros(1))], decay=0.9999)
    reference = [ema.get_decay(n) for n in range(1, 7)]
    ours = [float(step.ema_decay(jnp.array(n - 1), 0.9999)) for n in range(1, 7)]
    assert reference[0] == ours[0] == 0.0
    np.testing.assert_allclose(ours, reference, rtol=1e-6)
