"""FLOP counts for the MFU column: the training step's count includes every teacher pass."""

import functools

import jax
import pytest

from perflow_jax import flops, step
from tests.helpers.training import tiny_setup


def unrolled_fori_loop(lower, upper, body, init):
    """jax.lax.fori_loop as a Python loop: every iteration is traced, so every one is counted."""
    return functools.reduce(lambda carry, i: body(i, carry), range(lower, upper), init)


@pytest.mark.parametrize("guidance", [1.0, 7.5])
def test_the_step_count_equals_the_count_of_the_step_with_its_solver_loop_unrolled(guidance, monkeypatch):
    components, frozen, state, batch, optimizer = tiny_setup(batch_size=4)
    settings = step.PeRFlowSettings(solver_steps=5, teacher_guidance=guidance)

    def lowered_step():
        train_step = functools.partial(step.train_step, components=components, settings=settings, optimizer=optimizer)
        return jax.jit(train_step).lower(state, batch, jax.random.key(0), frozen)

    looped = lowered_step()
    counted = flops.train_step_flops(looped, components, settings, state.params, frozen, batch)
    monkeypatch.setattr(jax.lax, "fori_loop", unrolled_fori_loop)
    unrolled = flops.cost_flops(lowered_step())
    # The premise: XLA counts the loop's body once, and the teacher's passes are most of the step.
    assert unrolled > 1.5 * flops.cost_flops(looped)
    # Each of the S - 1 added solver steps also counts the solve's set-up outside its loop: a few
    # element-wise operations per latent element, nothing next to a UNet pass.
    latent_elements = batch["mean"].size
    assert abs(counted - unrolled) <= (settings.solver_steps - 1) * 16 * latent_elements
    assert counted == pytest.approx(unrolled, rel=1e-3)


def test_a_one_step_solver_needs_no_correction():
    components, frozen, state, batch, optimizer = tiny_setup(batch_size=4)
    settings = step.PeRFlowSettings(solver_steps=1)
    train_step = functools.partial(step.train_step, components=components, settings=settings, optimizer=optimizer)
    lowered = jax.jit(train_step).lower(state, batch, jax.random.key(0), frozen)
    counted = flops.train_step_flops(lowered, components, settings, state.params, frozen, batch)
    assert counted == flops.cost_flops(lowered)


def test_gradient_accumulation_leaves_the_count_of_a_step_unchanged():
    """The microbatch loop is counted once by XLA; the count adds the other microbatches."""
    components, frozen, state, batch, optimizer = tiny_setup(batch_size=8)
    settings = step.PeRFlowSettings(solver_steps=3)

    def counted(n):
        train_step = functools.partial(
            step.train_step, components=components, settings=settings, optimizer=optimizer, accumulation_steps=n
        )
        lowered = jax.jit(train_step).lower(state, batch, jax.random.key(0), frozen)
        return flops.train_step_flops(lowered, components, settings, state.params, frozen, batch, n), lowered

    (whole, _), (accumulated, lowered) = counted(1), counted(4)
    assert flops.cost_flops(lowered) < 0.5 * whole  # the premise: XLA counts one microbatch of four
    # Only the loop's bookkeeping and the division of the summed gradients by 4 differ: a few
    # operations per parameter, against hundreds of thousands per example and UNet pass.
    parameters = sum(x.size for x in jax.tree.leaves(state.params))
    assert abs(accumulated - whole) <= 4 * parameters
    assert accumulated == pytest.approx(whole, rel=1e-3)
