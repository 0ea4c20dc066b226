"""Flax parameter trees <-> PyTorch state dicts (diffusers / transformers key names).

The Flax twins in ``perflow_jax.models`` keep the PyTorch module names, dots included, so a
parameter path joined with "." is the state-dict key up to its last part. ``LEAF_RULES`` is the
whole mapping, read one way by ``params_to_state_dict`` and the other by
``state_dict_to_params``:

| Flax leaf  | rank | PyTorch leaf | layout change                                   |
|------------|------|--------------|-------------------------------------------------|
| kernel     | 4    | weight       | conv HWIO <-> OIHW                              |
| kernel     | 2    | weight       | dense [in, out] <-> Linear [out, in]            |
| scale      | 1    | weight       | GroupNorm / LayerNorm                           |
| embedding  | 2    | weight       | Embedding                                       |
| bias       | 1    | bias         |                                                 |

Reading also accepts the key names older diffusers checkpoints use (``LEGACY_RENAMES``) and drops
buffers that are not parameters (``IGNORED_TORCH_KEYS``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np


class LeafRule(NamedTuple):
    flax_leaf: str
    rank: int
    torch_leaf: str
    to_torch: tuple[int, ...] | None  # axes permutation Flax -> PyTorch, None for identity

    @property
    def to_flax(self) -> tuple[int, ...] | None:
        return None if self.to_torch is None else tuple(int(i) for i in np.argsort(self.to_torch))


LEAF_RULES = (
    LeafRule("kernel", 4, "weight", (3, 2, 0, 1)),
    LeafRule("kernel", 2, "weight", (1, 0)),
    LeafRule("scale", 1, "weight", None),
    LeafRule("embedding", 2, "weight", None),
    LeafRule("bias", 1, "bias", None),
)

# Older diffusers VAE checkpoints (e.g. SD1.5's) name the mid-block attention projections the
# way diffusers' AttentionBlock did; diffusers renames them on load, and so do we.
LEGACY_RENAMES = (
    (re.compile(r"(attentions\.\d+)\.query\."), r"\1.to_q."),
    (re.compile(r"(attentions\.\d+)\.key\."), r"\1.to_k."),
    (re.compile(r"(attentions\.\d+)\.value\."), r"\1.to_v."),
    (re.compile(r"(attentions\.\d+)\.proj_attn\."), r"\1.to_out.0."),
)

# Buffers some transformers versions save beside the parameters.
IGNORED_TORCH_KEYS = re.compile(r"(^|\.)position_ids$")


class WeightsMismatchError(ValueError):
    """A state dict does not fit a network: keys missing, unexpected or of the wrong shape."""


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b.0': {'kernel': x}}} -> {'a.b.0.kernel': x}."""
    flat = {}
    for name, value in tree.items():
        key = f"{prefix}{name}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, key + "."))
        else:
            flat[key] = value
    return flat


def _paths(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[str, tuple[str, ...]]:
    """Flattened key -> path tuple, keeping module names that contain dots intact."""
    paths = {}
    for name, value in tree.items():
        path = prefix + (name,)
        if isinstance(value, Mapping):
            paths.update(_paths(value, path))
        else:
            paths[".".join(path)] = path
    return paths


def _rule_for_flax(leaf: str, rank: int) -> LeafRule:
    for rule in LEAF_RULES:
        if rule.flax_leaf == leaf and rule.rank == rank:
            return rule
    raise ValueError(f"no weight rule for a Flax parameter {leaf!r} of rank {rank}")


def _permute(array: np.ndarray, axes: tuple[int, ...] | None) -> np.ndarray:
    return array if axes is None else np.ascontiguousarray(np.transpose(array, axes))


def params_to_state_dict(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Flax parameter tree -> flat PyTorch state dict of numpy arrays (same dtypes)."""
    state = {}
    for key, value in flatten(params).items():
        module, _, leaf = key.rpartition(".")
        array = np.asarray(value)
        rule = _rule_for_flax(leaf, array.ndim)
        state[f"{module}.{rule.torch_leaf}"] = _permute(array, rule.to_torch)
    return state


def state_dict_to_params(
    state_dict: Mapping[str, Any], template: Mapping[str, Any], *, name: str = "network"
) -> dict[str, Any]:
    """Flat PyTorch state dict -> Flax parameter tree shaped like ``template``.

    Args:
      state_dict: key -> array-like (numpy, or anything ``np.asarray`` takes).
      template: the network's parameter tree, e.g. from ``jax.eval_shape``; only the shapes of
        its leaves are read.
      name: what the weights are, for error messages ("unet", "vae", ...).
    Returns:
      A nested dict of numpy arrays in the state dict's dtypes.
    Raises:
      WeightsMismatchError: listing (in PyTorch key names) the first ten missing, unexpected and
        mis-shaped keys.
    """
    paths = _paths(template)
    # What each template leaf is called on the PyTorch side, and how to get it from there.
    wanted = {}
    for flat_key, path in paths.items():
        module, _, leaf = flat_key.rpartition(".")
        rule = _rule_for_flax(leaf, len(template_shape(template, path)))
        wanted[f"{module}.{rule.torch_leaf}"] = (path, rule)

    tree: dict[str, Any] = {}
    unexpected, misshaped = [], []
    seen = set()  # PyTorch-side keys (after legacy renames) that were found, fitting or not
    for torch_key, value in state_dict.items():
        if IGNORED_TORCH_KEYS.search(torch_key):
            continue
        key = _apply_legacy_renames(torch_key)
        if key not in wanted:
            unexpected.append(torch_key)
            continue
        path, rule = wanted[key]
        seen.add(key)
        expected = _torch_shape(template_shape(template, path), rule)
        if tuple(np.shape(value)) != expected:
            misshaped.append(f"{torch_key}: {tuple(np.shape(value))}, expected {expected}")
            continue
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = _permute(np.asarray(value), rule.to_flax)
    missing = [key for key in wanted if key not in seen]
    if missing or unexpected or misshaped:
        raise WeightsMismatchError(_mismatch_message(name, missing, unexpected, misshaped))
    return tree


def template_shape(template: Mapping[str, Any], path: tuple[str, ...]) -> tuple[int, ...]:
    node: Any = template
    for part in path:
        node = node[part]
    return tuple(node.shape)


def _torch_shape(flax_shape: tuple[int, ...], rule: LeafRule) -> tuple[int, ...]:
    return flax_shape if rule.to_torch is None else tuple(flax_shape[i] for i in rule.to_torch)


def _apply_legacy_renames(key: str) -> str:
    for pattern, replacement in LEGACY_RENAMES:
        key = pattern.sub(replacement, key)
    return key


def _mismatch_message(name: str, missing: list[str], unexpected: list[str], misshaped: list[str]) -> str:
    lines = [f"the {name} weights do not fit the {name} config:"]
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if keys:
            more = f" (first 10 of {len(keys)})" if len(keys) > 10 else ""
            lines.append(f"  {len(keys)} {label} keys{more}:")
            lines.extend(f"    {key}" for key in keys[:10])
    lines.append(
        "Are the weights and config.json from the same model (e.g. SDXL weights with an SD1.5 "
        "config)? Take both from one diffusers folder."
    )
    return "\n".join(lines)
