"""PeRFlow's plug-and-play delta weights into a PyTorch UNet (PERFLOW_SPEC.md, "Delta weights").

W = W_base + delta for every key of the UNet's state dict, added in the delta's dtype and cast
back to W's, as the authors' loader does; in place, after checking every key and shape first.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping

import torch
from safetensors import safe_open

# Width of the cross-attention key projection (text features) -> the model family it belongs to.
_ARCHITECTURES = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL"}


def merge_delta_weights(
    unet: torch.nn.Module, delta: str | os.PathLike | Mapping[str, torch.Tensor]
) -> torch.nn.Module:
    """Add ``delta`` (a flat ``delta_weights.safetensors`` with diffusers key names, or a dict of
    tensors) to ``unet``'s weights in place and return ``unet``.

    The delta must hold exactly the UNet's state-dict keys with the same shapes; a file is read
    one tensor at a time, so the delta never sits in memory whole.
    """
    if isinstance(delta, Mapping):
        _merge(unet, delta.keys(), lambda key: tuple(delta[key].shape), delta.__getitem__)
    else:
        with safe_open(os.fspath(delta), framework="pt") as f:
            _merge(unet, f.keys(), lambda key: tuple(f.get_slice(key).get_shape()), f.get_tensor)
    return unet


def _merge(
    unet: torch.nn.Module,
    keys: Iterable[str],
    shape_of: Callable[[str], tuple[int, ...]],
    tensor_of: Callable[[str], torch.Tensor],
) -> None:
    state = unet.state_dict()
    keys = set(keys)
    missing, unexpected = sorted(state.keys() - keys), sorted(keys - state.keys())
    hint = (
        "a delta applies only to the architecture it was made from (is the delta for SDXL while the UNet is "
        "SD1.5?); a UNet with LoRA or adapter layers loaded has extra keys: fuse or unload them first"
    )
    if missing:
        raise ValueError(f"the delta lacks {len(missing)} of the UNet's keys, e.g. {missing[:3]}: {hint}")
    if unexpected:
        raise ValueError(f"the delta has {len(unexpected)} keys the UNet lacks, e.g. {unexpected[:3]}: {hint}")
    shapes = {key: shape_of(key) for key in keys}
    for key, W in state.items():
        if shapes[key] != tuple(W.shape):
            theirs = _architecture(shapes)
            ours = _architecture({k: tuple(v.shape) for k, v in state.items()})
            raise ValueError(
                f"delta[{key!r}] has shape {shapes[key]} but the UNet's weight has {tuple(W.shape)}: the delta is "
                f"for {theirs} while the UNet is {ours}; a delta applies only to the architecture it was made from"
            )
    updated = set()  # storages already merged: a weight tied under two keys gets its delta once
    with torch.no_grad():
        for key, W in state.items():
            if W.data_ptr() in updated:
                continue
            delta = tensor_of(key).to(W.device)
            W.copy_((W.to(delta.dtype) + delta).to(W.dtype))
            updated.add(W.data_ptr())


def _architecture(shapes: Mapping[str, tuple[int, ...]]) -> str:
    """'SD1.x', 'SD2.x' or 'SDXL' from the input width of the first cross-attention key projection."""
    for key, shape in sorted(shapes.items()):
        if key.endswith("attn2.to_k.weight") and len(shape) == 2:
            width = shape[1]
            return _ARCHITECTURES.get(width, f"a model with {width}-wide text features")
    return "a model without cross-attention"
