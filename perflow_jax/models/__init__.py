"""Flax twins of the diffusers / transformers networks that Stable Diffusion is made of.

Every module here keeps the PyTorch original's submodule names (dots included, e.g.
``down_blocks.0``), so a parameter tree flattened with "." gives the PyTorch state-dict key up
to the leaf name; ``perflow_jax.weights`` holds the few leaf rules that finish the mapping.
Parameters are float32; ``dtype`` sets the computation dtype. Images and latents are NHWC
inside and at the public interface: ``sample: [B, H, W, C]``.
"""
