"""Dense and Conv: flax's layers to the bit, with bias gradients summed in float32."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perflow_jax.models.blocks import Conv, Dense, broadcast_add


def pairs():
    """(ours, flax's) with the same parameter names, and an input for them."""
    x_tokens = jax.random.normal(jax.random.key(1), (2, 10, 12))
    x_image = jax.random.normal(jax.random.key(2), (2, 9, 9, 6))
    return [
        (lambda dtype: Dense(8, dtype=dtype), lambda dtype: nn.Dense(8, dtype=dtype), x_tokens),
        (lambda dtype: Dense(8, use_bias=False, dtype=dtype), lambda dtype: nn.Dense(8, use_bias=False, dtype=dtype),
         x_tokens),
        (lambda dtype: Conv(5, 3, padding=1, dtype=dtype),
         lambda dtype: nn.Conv(5, (3, 3), padding=((1, 1), (1, 1)), dtype=dtype), x_image),
        (lambda dtype: Conv(5, 3, stride=2, dtype=dtype),
         lambda dtype: nn.Conv(5, (3, 3), strides=(2, 2), padding=((0, 0), (0, 0)), dtype=dtype), x_image),
    ]  # fmt: skip


@pytest.mark.parametrize("index", range(4))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_layers_initialise_and_compute_as_flaxs(index, dtype):
    ours, theirs, x = pairs()[index]
    params = ours(dtype).init(jax.random.key(0), x)
    expected = theirs(dtype).init(jax.random.key(0), x)
    assert jax.tree.structure(params) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(a, b)
    params = jax.tree.map(lambda p: p + 0.1, params)  # a non-zero bias
    out = ours(dtype).apply(params, x)
    assert out.dtype == dtype
    np.testing.assert_array_equal(out, theirs(dtype).apply(params, x))


@pytest.mark.parametrize("b_shape", [(64,), (4, 1, 1, 64)])  # a bias; the ResNets' time embedding
def test_the_gradient_of_a_broadcast_addend_is_summed_in_float32(b_shape):
    y = jnp.zeros((4, 32, 32, 64), jnp.bfloat16)
    b = jnp.zeros(b_shape, jnp.float32 if len(b_shape) == 1 else jnp.bfloat16)
    g = jax.random.normal(jax.random.key(0), y.shape, jnp.bfloat16)  # the cotangent, as bfloat16 as it comes

    def loss(b):
        return jnp.sum((broadcast_add(y, b) * g).astype(jnp.float32))

    grad = jax.grad(loss)(b)
    axes = (0, 1, 2) if len(b_shape) == 1 else (1, 2)
    exact = np.asarray(g, np.float64).sum(axis=axes).reshape(b_shape)
    error = np.linalg.norm(np.asarray(grad, np.float64) - exact) / np.linalg.norm(exact)
    print(f"{b_shape}: relative error {error:.1e}")
    # A float32 sum of 1024 to 4096 terms: ~1e-7. A bfloat16 result (the time embedding) adds one
    # rounding, 2^-9 ~ 2e-3 at most; bfloat16 accumulation would be several times that.
    assert error < (1e-6 if b.dtype == jnp.float32 else 3e-3)
