"""perflow_jax: PeRFlow (piecewise rectified flow) distillation of Stable Diffusion in JAX."""

__version__ = "0.1.0"
