"""Every attention backend computes softmax(q k^T / sqrt(d)) v, within its dtype's rounding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perflow_jax.models import attention
from perflow_jax.models.attention import dot_product_attention


def reference(q, k, v, is_causal=False):
    """Float64 NumPy attention over [B, T, H, D] arrays."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    logits = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    if is_causal:
        logits = np.where(np.tril(np.ones(logits.shape[-2:], bool)), logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", weights, v)


def backends_here():
    """The backends this platform runs (splash through the Pallas interpreter off TPU)."""
    names = ["auto", "xla", "splash"]
    if jax.default_backend() == "gpu":
        names.append("cudnn")
    return names


def inputs(t, s, heads, d, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(
        jnp.asarray(rng.standard_normal(shape), dtype)
        for shape in ((2, t, heads, d), (2, s, heads, d), (2, s, heads, d))
    )


# (query tokens, key tokens, head dim): SD-like shapes, odd lengths that need padding for splash.
SHAPES = [(64, 64, 40), (100, 77, 64), (33, 7, 160)]
# Relative error bound per dtype: float32 attention sums agree to ~1e-6; bfloat16 inputs and
# outputs carry 8 significant bits: the output and the probabilities are rounded (2^-9 ~ 2e-3 each).
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


@pytest.mark.parametrize("backend", backends_here())
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_backend_matches_float64_reference(backend, shape, dtype):
    if backend == "cudnn" and dtype == jnp.float32:
        pytest.skip("cuDNN fused attention takes bfloat16/float16 only")
    q, k, v = inputs(*shape[:2], 2, shape[2], dtype)
    out = dot_product_attention(q, k, v, backend=backend, splash_interpret=jax.default_backend() != "tpu")
    assert out.shape == q.shape and out.dtype == dtype
    expected = reference(q, k, v)
    err = np.linalg.norm(np.asarray(out, np.float64) - expected) / np.linalg.norm(expected)
    print(f"{backend} {shape} {jnp.dtype(dtype).name}: relative error {err:.2e}")
    assert err < TOLERANCE[dtype]


def test_causal_mask_hides_later_tokens():
    q, k, v = inputs(12, 12, 2, 16, jnp.float32)
    out = dot_product_attention(q, k, v, is_causal=True, backend="xla")
    np.testing.assert_allclose(out, reference(q, k, v, is_causal=True), rtol=1e-5, atol=1e-6)
    # The first token sees only itself.
    np.testing.assert_allclose(out[:, 0], v[:, 0], rtol=1e-6)


def test_unknown_backend_is_named_in_the_error():
    q, k, v = inputs(4, 4, 1, 8, jnp.float32)
    with pytest.raises(ValueError, match="unknown attention backend 'flash'.*auto, xla, cudnn, splash"):
        dot_product_attention(q, k, v, backend="flash")


def test_splash_refuses_a_causal_mask():
    q, k, v = inputs(4, 4, 1, 8, jnp.float32)
    with pytest.raises(ValueError, match="no causal mask"):
        dot_product_attention(q, k, v, is_causal=True, backend="splash", splash_interpret=True)


def test_an_attention_with_xla_backward_has_xla_attentions_value_and_gradients():
    q, k, v = inputs(24, 7, 2, 16, jnp.float32)
    weights = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)

    def loss(attend):
        return lambda q, k, v: jnp.sum(weights * attend(q, k, v))

    def xla(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, implementation="xla")

    def wrapped(q, k, v):  # on a GPU, "cudnn" is the forward; the CPU has only XLA's
        return attention.with_xla_backward(q, k, v, False, "xla")

    np.testing.assert_array_equal(wrapped(q, k, v), xla(q, k, v))
    for ours, expected in zip(
        jax.grad(loss(wrapped), argnums=(0, 1, 2))(q, k, v),
        jax.grad(loss(xla), argnums=(0, 1, 2))(q, k, v),
        strict=True,
    ):
        # The same float32 operations on the same inputs: equal up to XLA's fusion choices.
        np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "cudnn, picked",
    [((True, True), "cudnn"), ((True, False), attention.CUDNN_FORWARD), ((False, False), "xla")],
)
def test_auto_on_a_gpu_takes_cudnn_for_what_cudnn_accepts_and_xla_for_a_refused_backward(cudnn, picked, monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(attention, "_cudnn_accepts", lambda q, k, is_causal: cudnn)
    q = jax.ShapeDtypeStruct((2, 4096, 8, 40), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((2, 77, 8, 40), jnp.bfloat16)
    assert attention._auto_backend(q, k, False) == picked
