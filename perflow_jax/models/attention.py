"""The one attention entry point of every network in this package.

``dot_product_attention(q, k, v)`` computes softmax(q k^T * scale) v with logits and softmax in
float32 whatever the input dtype (so diffusers' ``upcast_attention`` / ``upcast_softmax`` are
always honoured). The backend is a config value:

- ``"xla"``: ``jax.nn.dot_product_attention(implementation="xla")``, every platform.
- ``"cudnn"``: cuDNN's fused flash attention on NVIDIA GPUs (bfloat16 / float16 inputs).
- ``"splash"``: the Pallas splash-attention kernel on TPU (no causal mask; any sequence length,
  padded to the kernel's block size; head dims padded to 128 lanes).
- ``"auto"`` (default): cuDNN on GPU where it accepts the shapes and dtype, splash on TPU for
  self-attention of at least ``SPLASH_MIN_SEQ`` tokens, XLA otherwise. Where cuDNN takes a shape
  for inference but refuses its backward (SD's cross-attention, 4096 queries on 77 keys, on an
  H200 with jax 0.11.2), ``auto`` runs cuDNN's forward with XLA's backward: the frozen teacher
  and text encoders, never differentiated, then run cuDNN only.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

BACKENDS = ("auto", "xla", "cudnn", "splash")

# Below this many tokens the splash kernel's padding and launch cost is not worth it (SD1.5's
# cross-attention has 77 keys; its self-attention 4096 / 1024 / 256 / 64 tokens at 512 px).
SPLASH_MIN_SEQ = 1024
_SPLASH_BLOCK = 512
_LANES = 128


def check_backend(backend: str) -> str:
    """Return ``backend`` or raise a ValueError that lists the valid names."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    return backend


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    is_causal: bool = False,
    backend: str = "auto",
    splash_interpret: bool = False,
) -> jax.Array:
    """Scaled dot-product attention.

    Args:
      q: [B, T, H, D] queries; k, v: [B, S, H, D] keys and values, same dtype.
      is_causal: mask position t from attending to positions after t (CLIP's text encoder).
      backend: one of ``BACKENDS``.
      splash_interpret: run the splash kernel in the Pallas interpreter (tests on the CPU).
    Returns:
      [B, T, H, D] in the dtype of ``v``.
    """
    check_backend(backend)
    if backend == "auto":
        backend = _auto_backend(q, k, is_causal)
    if backend == "splash":
        if is_causal:
            raise ValueError("the splash backend has no causal mask here: use 'xla' or 'auto'")
        return _splash_attention(q, k, v, interpret=splash_interpret)
    if backend == CUDNN_FORWARD:
        return with_xla_backward(q, k, v, is_causal, "cudnn")
    return jax.nn.dot_product_attention(q, k, v, is_causal=is_causal, implementation=backend)


# What ``auto`` picks where cuDNN's forward takes the shapes and its backward does not.
CUDNN_FORWARD = "cudnn forward, xla backward"


def _auto_backend(q: jax.Array, k: jax.Array, is_causal: bool) -> str:
    platform = jax.default_backend()
    if platform == "gpu":
        forward, backward = _cudnn_accepts(q, k, is_causal)
        if forward:
            return "cudnn" if backward else CUDNN_FORWARD
    if platform == "tpu" and not is_causal and q.shape[1] >= SPLASH_MIN_SEQ and k.shape[1] >= SPLASH_MIN_SEQ:
        return "splash"
    return "xla"


def _cudnn_accepts(q: jax.Array, k: jax.Array, is_causal: bool) -> tuple[bool, bool]:
    """Whether cuDNN's fused attention takes these shapes and dtype: (for the forward, for the backward).

    Checked by tracing: cuDNN's training kernels are stricter (on an H200 with jax 0.11.2 they
    refuse SD's cross-attention, 4096 queries on 77 keys, which inference takes).
    """
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return False, False
    attention = functools.partial(jax.nn.dot_product_attention, is_causal=is_causal, implementation="cudnn")

    def forward_and_backward(q, k, v):
        out, vjp = jax.vjp(attention, q, k, v)
        return vjp(out)

    def traces(function) -> bool:
        try:
            jax.eval_shape(function, q, k, k)
        except (NotImplementedError, ValueError, RuntimeError):
            return False
        return True

    forward = traces(attention)
    return forward, forward and traces(forward_and_backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def with_xla_backward(q: jax.Array, k: jax.Array, v: jax.Array, is_causal: bool, implementation: str) -> jax.Array:
    """``jax.nn.dot_product_attention`` by ``implementation``, differentiated as XLA's attention.

    The backward recomputes XLA's forward from q, k and v (the only residuals) and takes its
    vector-Jacobian product; a function that is never differentiated runs ``implementation`` only.
    """
    return jax.nn.dot_product_attention(q, k, v, is_causal=is_causal, implementation=implementation)


def _with_xla_backward_forward(q, k, v, is_causal, implementation):
    return with_xla_backward(q, k, v, is_causal, implementation), (q, k, v)


def _with_xla_backward_backward(is_causal, implementation, residuals, g):
    xla = functools.partial(jax.nn.dot_product_attention, is_causal=is_causal, implementation="xla")
    _, vjp = jax.vjp(xla, *residuals)
    return vjp(g)


with_xla_backward.defvjp(_with_xla_backward_forward, _with_xla_backward_backward)


def _splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, interpret: bool) -> jax.Array:
    """Splash attention over [B, T, H, D] inputs, padding T, S to the block and D to 128 lanes.

    Zero-padding the head dim leaves q.k unchanged and adds zero output columns (sliced off);
    padded keys are masked out through segment ids, padded queries are sliced off.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    _, t, h, d = q.shape
    s = k.shape[1]
    t_pad, s_pad = _round_up(t, _SPLASH_BLOCK), _round_up(s, _SPLASH_BLOCK)
    d_pad = _round_up(d, _LANES)
    q = q * jnp.asarray(1.0 / math.sqrt(d), q.dtype)  # the kernel does not scale

    def pad(x, length):
        return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, d_pad - d)))

    q, k, v = pad(q, t_pad), pad(k, s_pad), pad(v, s_pad)
    mask = sm.MultiHeadMask([sm.FullMask((t_pad, s_pad))] * h)
    sizes = "block_q block_kv block_kv_compute block_q_dkv block_kv_dkv block_kv_dkv_compute block_q_dq block_kv_dq"
    block = sk.BlockSizes(**dict.fromkeys(sizes.split(), _SPLASH_BLOCK))  # every block the same size
    kernel = sk.make_splash_mha(mask, block_sizes=block, head_shards=1, q_seq_shards=1, interpret=interpret)
    segments = sk.SegmentIds(
        q=(jnp.arange(t_pad) >= t).astype(jnp.int32), kv=(jnp.arange(s_pad) >= s).astype(jnp.int32)
    )
    # The kernel works on one example: [H, T, D].
    out = jax.vmap(lambda qi, ki, vi: kernel(qi, ki, vi, segment_ids=segments))(
        q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    )
    return out.transpose(0, 2, 1, 3)[:, :t, :, :d]


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
