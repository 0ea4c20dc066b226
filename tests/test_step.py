"""The training step: values of one update, EMA warm-up, and the same result on every mesh."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perflow_jax import pipeline, step
from tests.helpers.processes import run_with_devices
from tests.helpers.training import LR, tiny_setup


def test_ema_warm_up_is_the_references():
    decays = step.ema_decay(jnp.arange(4), 0.9999)
    np.testing.assert_allclose(decays, [0, 2 / 11, 3 / 12, 4 / 13], rtol=1e-6)
    assert float(step.ema_decay(jnp.array(10**6), 0.9999)) == np.float32(0.9999)


def test_one_step_updates_student_optimizer_and_ema():
    components, frozen, state, batch, optimizer = tiny_setup()
    settings = step.PeRFlowSettings()
    run = jax.jit(lambda s, b, r: step.train_step(s, b, r, frozen, components=components, settings=settings,
                                                  optimizer=optimizer))  # fmt: skip
    new, metrics = run(state, batch, jax.random.key(1))
    assert int(new.step) == 1 and np.isfinite(float(metrics["loss"]))
    assert float(metrics["window_count"].sum()) == 8 and float(metrics["grad_norm"]) > 0
    delta = jax.tree.map(lambda a, b: np.abs(np.asarray(a) - np.asarray(b)).max(), new.params, state.params)
    # AdamW's first step moves every weight that has a gradient by about lr (clipping rescales g only).
    assert 0.5 * LR < max(jax.tree.leaves(delta)) < 1.5 * LR
    # EMA after the first update (decay 0): the updated student, bit for bit.
    for updated, ema in zip(*(jax.tree.leaves(x) for x in (new.params, new.ema_params)), strict=True):
        np.testing.assert_array_equal(ema, updated)


def test_the_teacher_at_the_student_init_makes_a_small_eps_loss_for_ddim_eps():
    """Sanity of the plumbing: a student equal to its teacher is already close for ddim_eps."""
    components, frozen, state, batch, optimizer = tiny_setup()

    def losses(parameterization):
        settings = step.PeRFlowSettings(parameterization=parameterization)
        run = jax.jit(lambda s, b, r: step.train_step(s, b, r, frozen, components=components, settings=settings,
                                                      optimizer=optimizer))  # fmt: skip
        return run(state, batch, jax.random.key(2))[1]

    close, far = losses("ddim_eps"), losses("velocity")
    assert float(close["loss"]) < float(far["loss"])


def test_the_settings_huber_constant_reaches_the_loss():
    """The step's huber loss is mean(sqrt(d^2 + c^2) - c) of the student's error d, with the settings' c."""
    components, frozen, state, batch, _ = tiny_setup()
    settings = step.PeRFlowSettings(distance="huber", huber_c=0.5)
    examples = step.draw_examples(jax.random.key(4), batch, components=components, settings=settings)
    gradients = jax.jit(functools.partial(step.reflow_gradients, components=components, settings=settings))
    _, metrics = gradients(state.params, examples, frozen)
    reflow = step.reflow_problem(examples, frozen, components=components, settings=settings)
    prediction = pipeline.unet_apply(components.student, state.params)(reflow.z_t, reflow.t * 1000.0, reflow.cond)
    d = prediction.astype(jnp.float32) - reflow.target
    # float32, the same operations compiled apart: sums in another order, so rtol 1e-5.
    np.testing.assert_allclose(metrics["loss"], jnp.mean(jnp.sqrt(d**2 + 0.25) - 0.5), rtol=1e-5)


def test_microbatch_j_holds_the_examples_whose_index_is_j_modulo_n():
    split = step.microbatches({"x": jnp.arange(12).reshape(6, 2)}, 3)
    np.testing.assert_array_equal(split["x"][:, :, 0], [[0, 6], [2, 8], [4, 10]])
    with pytest.raises(ValueError, match="a batch of 6 examples does not split into 4 equal microbatches"):
        step.microbatches({"x": jnp.arange(12).reshape(6, 2)}, 4)


def test_gradients_accumulated_over_microbatches_equal_the_gradients_of_the_whole_batch(n=4):
    components, frozen, state, batch, _ = tiny_setup()
    settings = step.PeRFlowSettings()
    examples = step.draw_examples(jax.random.key(4), batch, components=components, settings=settings)
    whole = jax.jit(functools.partial(step.reflow_gradients, components=components, settings=settings))
    accumulated = jax.jit(
        functools.partial(step.accumulated_gradients, components=components, settings=settings, accumulation_steps=n)
    )
    (grads, metrics), (acc_grads, acc_metrics) = (
        whole(state.params, examples, frozen),
        accumulated(state.params, examples, frozen),
    )
    # The same float32 numbers summed in another order (over n microbatches, then divided by n):
    # through the backward pass that differs by up to 4.4e-6 of a leaf's largest gradient here.
    np.testing.assert_allclose(acc_metrics["loss"], metrics["loss"], rtol=1e-5)
    np.testing.assert_allclose(acc_metrics["window_loss_sum"], metrics["window_loss_sum"], rtol=1e-5)
    np.testing.assert_array_equal(acc_metrics["window_count"], metrics["window_count"])
    for g, a in zip(jax.tree.leaves(grads), jax.tree.leaves(acc_grads), strict=True):
        np.testing.assert_allclose(a, g, rtol=1e-4, atol=1e-5 * float(np.abs(g).max()))


def test_a_step_with_accumulation_draws_the_same_examples_and_makes_the_same_update():
    components, frozen, state, batch, optimizer = tiny_setup()
    settings = step.PeRFlowSettings()

    def run(n):
        train_step = functools.partial(
            step.train_step, components=components, settings=settings, optimizer=optimizer, accumulation_steps=n
        )
        return jax.jit(train_step)(state, batch, jax.random.key(5), frozen)

    (new, metrics), (acc_new, acc_metrics) = run(1), run(2)
    np.testing.assert_allclose(acc_metrics["grad_norm"], metrics["grad_norm"], rtol=1e-5)
    np.testing.assert_array_equal(acc_metrics["window_count"], metrics["window_count"])
    pairs = zip(jax.tree.leaves(acc_new.params), jax.tree.leaves(new.params), strict=True)
    diffs = np.concatenate([np.abs(np.asarray(a) - np.asarray(b)).ravel() for a, b in pairs])
    # AdamW's first step moves a weight by about lr sign(g): equal wherever g is well above rounding.
    assert np.quantile(diffs, 0.999) < 1e-3 * LR and diffs.max() < 0.2 * LR


MESH_SCRIPT = """
import jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from perflow_jax import sharding, step
from tests.helpers.training import tiny_setup
components, frozen, state, batch, optimizer = tiny_setup()
settings = step.PeRFlowSettings()
def run(s, b, r, f):
    return step.train_step(s, b, r, f, components=components, settings=settings, optimizer=optimizer)
rng = jax.random.key(3)
single = jax.jit(run)(state, batch, rng, frozen)
results = {}
for shape in ((8, 1), (4, 2), (1, 8)):
    mesh = sharding.make_mesh(shape)
    state_shardings = sharding.parameter_shardings(state, mesh)
    frozen_shardings = sharding.parameter_shardings(frozen, mesh)
    batch_shardings = {k: sharding.batch_sharding(mesh) for k in batch}
    in_shardings = (state_shardings, batch_shardings, sharding.replicated(mesh), frozen_shardings)
    compiled = jax.jit(run, in_shardings=in_shardings, out_shardings=(state_shardings, sharding.replicated(mesh)))
    placed = jax.device_put((state, batch, frozen), (state_shardings, batch_shardings, frozen_shardings))
    new, metrics = compiled(placed[0], placed[1], rng, placed[2])
    diffs = np.concatenate([np.abs(np.asarray(a) - np.asarray(b)).ravel()
                            for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(single[0].params))])
    loss_diff = abs(float(metrics["loss"]) - float(single[1]["loss"])) / float(single[1]["loss"])
    norm_diff = abs(float(metrics["grad_norm"]) - float(single[1]["grad_norm"])) / float(single[1]["grad_norm"])
    print(shape, loss_diff, norm_diff, float(np.quantile(diffs, 0.999)), float(diffs.max()))
"""


def test_the_step_on_every_mesh_equals_the_step_on_one_device():
    lines = [line for line in run_with_devices(MESH_SCRIPT).splitlines() if line.startswith("(")]
    assert len(lines) == 3
    for line in lines:
        shape, loss_diff, norm_diff, q999, largest = line.rsplit(" ", 4)
        print(
            f"mesh {shape}: relative difference of the loss {float(loss_diff):.1e}, of the gradient norm "
            f"{float(norm_diff):.1e}; parameters: 99.9th percentile {float(q999):.1e}, largest {float(largest):.1e}"
        )
        # Sharded sums add the same float32 numbers in another order: loss and gradient norm agree
        # to ~1e-6. AdamW's first step moves a weight by lr g / (|g| + 1e-8): lr sign(g) wherever the
        # gradient is well above 1e-8, so nearly all weights agree to rounding; a weight whose
        # gradient is within a few eps of zero moves by a rounding-dependent fraction of lr.
        assert float(loss_diff) < 1e-5 and float(norm_diff) < 1e-5
        assert float(q999) < 1e-3 * LR
        assert float(largest) < 0.2 * LR


COLLECTIVES_SCRIPT = """
import functools, re, jax
from perflow_jax import sharding, step
from tests.helpers.training import tiny_setup
components, frozen, state, batch, optimizer = tiny_setup(batch_size=16)
mesh = sharding.make_mesh((8, 1))
state_shardings = sharding.parameter_shardings(state, mesh)
in_shardings = (state_shardings, {k: sharding.batch_sharding(mesh) for k in batch}, sharding.replicated(mesh),
                sharding.parameter_shardings(frozen, mesh))
run = functools.partial(step.train_step, components=components, settings=step.PeRFlowSettings(), optimizer=optimizer,
                        accumulation_steps=2)
jitted = jax.jit(run, in_shardings=in_shardings, out_shardings=(state_shardings, sharding.replicated(mesh)))
text = jitted.lower(state, batch, jax.random.key(0), frozen).compile().as_text()
for op in ("all-to-all", "collective-permute", "all-gather"):
    print("moves", op, len(re.findall(rf" {op}(-start)?\\(", text)))
"""


def test_microbatches_are_split_where_the_examples_are_without_moving_them():
    """Data parallel over 8 devices, 2 examples each, 2 microbatches: no example leaves its device
    (the step's only collective is the gradients' all-reduce)."""
    lines = [line.split() for line in run_with_devices(COLLECTIVES_SCRIPT).splitlines() if line.startswith("moves")]
    assert {op: int(count) for _, op, count in lines} == {"all-to-all": 0, "collective-permute": 0, "all-gather": 0}
