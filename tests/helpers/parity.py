"""Helpers for comparing a Flax twin with its PyTorch original, and random PyTorch originals to compare."""

from __future__ import annotations

import numpy as np

# Whole networks in float32 agree with their PyTorch originals to about 1e-6 relative error
# (sums in another order); 1e-5 leaves room for deep stacks while still catching any real
# difference (a wrong epsilon, activation or layout shows at 1e-3 or more).
FLOAT32_NETWORK_RTOL = 1e-5


def random_module(build, seed: int = 0):
    """``build()`` under ``torch.manual_seed(seed)``, in eval mode, with its 1-D parameters (norm
    scales and biases) moved off their initial ones and zeros, so that a swapped or missing one shows."""
    import torch

    torch.manual_seed(seed)
    module = build().eval()
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return module


def random_torch_unet(config: dict, seed: int = 0):
    """A diffusers UNet2DConditionModel of ``config`` (its keyword arguments), made by ``random_module``."""
    import diffusers

    return random_module(lambda: diffusers.UNet2DConditionModel(**config), seed)


def torch_state_dict(module) -> dict[str, np.ndarray]:
    """A PyTorch module's state dict as numpy arrays (copies)."""
    return {key: value.detach().cpu().numpy().copy() for key, value in module.state_dict().items()}


def relative_error(actual, expected) -> float:
    """||actual - expected|| / ||expected|| over all elements, in float64."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def nchw_to_nhwc(array) -> np.ndarray:
    return np.transpose(np.asarray(array), (0, 2, 3, 1))


def nhwc_to_nchw(array) -> np.ndarray:
    return np.transpose(np.asarray(array), (0, 3, 1, 2))


class DrainingStateDict:
    """A PyTorch module's parameters as a read-once mapping of numpy copies.

    Each tensor's memory is released as soon as it has been handed out, so converting a network
    needs its size once, not twice (SDXL's UNet is 10 GB in float32; CI machines have 24 GB).
    """

    def __init__(self, module):
        self._tensors = dict(module.state_dict(keep_vars=True))  # the parameters themselves

    def items(self):
        for key in list(self._tensors):
            tensor = self._tensors.pop(key)
            array = tensor.detach().cpu().numpy().copy()
            tensor.data = tensor.data.new_empty(0)
            yield key, array
