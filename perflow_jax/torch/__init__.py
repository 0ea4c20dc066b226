"""The PyTorch side of exports: a diffusers PeRFlow scheduler and the delta-weight loader.

Imports only torch, numpy, safetensors and diffusers (no JAX), so exported models run where only
the PyTorch stack is installed.
"""

from perflow_jax.torch.delta import merge_delta_weights
from perflow_jax.torch.scheduler import PeRFlowScheduler

__all__ = ["PeRFlowScheduler", "merge_delta_weights"]
