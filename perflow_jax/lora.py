"""LoRA students: low-rank adapters on the UNet's linear and convolution kernels, as peft's ``LoraConfig`` makes them.

An adapter of a module with kernel W adds ``scale * delta(A, B)`` to it, scale = lora_alpha / r:
a linear layer's A is [in, r] and B [r, out] (delta = A B); a convolution's A is a convolution with
W's kernel size [kh, kw, in, r] and B a 1x1 one [1, 1, r, out] (delta = A B over the rank axis),
as peft does for ``nn.Linear`` and ``nn.Conv2d``. A starts Kaiming-uniform (peft's a = sqrt(5):
U(-1/sqrt(fan_in), 1/sqrt(fan_in))) and B at zero, so a new adapter changes nothing.

The adapters are a tree beside the UNet's parameters, nested like them, with ``lora_A`` and
``lora_B`` modules under each adapted one; ``weights.params_to_state_dict`` names and lays them
out as peft does (``...attn1.to_q.lora_A.weight`` [r, in]). The UNet's parameters stay untouched:
``merge`` is the kernel transform, so a LoRA student's teacher is the same base without it.

Files: ``save`` writes ``pytorch_lora_weights.safetensors`` in the layout diffusers'
``load_lora_weights`` reads ("diffusers": ``unet.``-prefixed peft keys with the adapter config in
the metadata, as ``save_lora_weights`` writes it; "kohya": the authors' training script's names);
``read`` reads either back, and ``merge_files`` adds files' adapters to a UNet.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from perflow_jax import weights

# The UNet modules the authors' train_perflow_lora.py adapts (peft's target_modules: a module is
# adapted when its name is one of these or ends with "." and one of these).
DEFAULT_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
)  # fmt: skip
LORA_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers' load_lora_weights(DIR) looks for
FORMATS = ("diffusers", "kohya")
METADATA_KEY = "lora_adapter_metadata"  # where diffusers keeps the adapter's LoraConfig in the file
KOHYA_PREFIX = "lora_unet_"
PEFT_PREFIXES = ("unet.", "base_model.model.")  # diffusers' save_lora_weights, peft's save_pretrained
SAMPLE_HELP = "a UNet LoRA (diffusers/peft or kohya .safetensors) merged in at SCALE (default 1); repeatable"


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """A run's adapters: rank r, lora_alpha and the target module names (static under jit)."""

    rank: int
    alpha: float
    targets: tuple[str, ...] = DEFAULT_TARGETS

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def spec(model_config: Mapping[str, Any]) -> LoraSpec | None:
    """The LoraSpec of a config's ``model`` group (ConfigDict or saved dict); None for a full fine-tune (rank 0).

    A config saved before the LoRA keys existed is a full fine-tune.
    """
    rank = int(model_config.get("lora_rank", 0))
    if rank == 0:
        return None
    return LoraSpec(rank, float(model_config["lora_alpha"]), tuple(model_config["lora_targets"]))


def _kernels(params: Mapping[str, Any], path: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """{module path: its kernel} of every module of ``params`` that has one."""
    found = {}
    for name, value in params.items():
        if isinstance(value, Mapping):
            found.update(_kernels(value, path + (name,)))
        elif name == "kernel":
            found[path] = value
    return found


def _matches(path: tuple[str, ...], target: str) -> bool:
    name = ".".join(path)
    return name == target or name.endswith("." + target)


def target_kernels(params: Mapping[str, Any], targets: Sequence[str]) -> dict[tuple[str, ...], Any]:
    """{module path: kernel} of the modules of the UNet ``params`` that ``targets`` adapt."""
    return {path: kernel for path, kernel in _kernels(params).items() if any(_matches(path, t) for t in targets)}


def unmatched_targets(params: Mapping[str, Any], targets: Sequence[str]) -> list[str]:
    """The targets that name no module of ``params``, except the authors' (a small UNet may lack downsamplers)."""
    paths = list(_kernels(params))
    return [t for t in targets if t not in DEFAULT_TARGETS and not any(_matches(p, t) for p in paths)]


def _nest(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return tree


def _adapter_shapes(kernel_shape: tuple[int, ...], rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(A's shape, B's shape) for a kernel [in, out] or [kh, kw, in, out]."""
    if len(kernel_shape) == 2:
        return (kernel_shape[0], rank), (rank, kernel_shape[1])
    kh, kw, n_in, n_out = kernel_shape
    return (kh, kw, n_in, rank), (1, 1, rank, n_out)


def init_adapters(key: jax.Array, params: Mapping[str, Any], lora: LoraSpec) -> dict[str, Any]:
    """New float32 adapters for the UNet ``params`` (arrays or ShapeDtypeStructs): A ~ U(+-1/sqrt(fan_in)), B = 0."""
    flat = {}
    kernels = target_kernels(params, lora.targets)
    for i, (path, kernel) in enumerate(sorted(kernels.items())):
        a_shape, b_shape = _adapter_shapes(tuple(kernel.shape), lora.rank)
        bound = 1.0 / math.sqrt(math.prod(a_shape[:-1]))  # fan_in: in x kh x kw
        a = jax.random.uniform(jax.random.fold_in(key, i), a_shape, jnp.float32, -bound, bound)
        flat[path + ("lora_A", "kernel")] = a
        flat[path + ("lora_B", "kernel")] = jnp.zeros(b_shape, jnp.float32)
    return _nest(flat)


def _pairs(adapters: Mapping[str, Any]) -> dict[tuple[str, ...], tuple[Any, Any]]:
    """{adapted module path: (A, B)}."""
    kernels = _kernels(adapters)
    return {path[:-1]: (a, kernels[path[:-1] + ("lora_B",)]) for path, a in kernels.items() if path[-1] == "lora_A"}


def delta(a: Any, b: Any) -> Any:
    """The kernel-shaped update B A of one adapter: [in, r] x [r, out], or [kh, kw, in, r] x [1, 1, r, out]."""
    xp = np if isinstance(a, np.ndarray) and isinstance(b, np.ndarray) else jnp
    if a.ndim == 2:
        return xp.matmul(a, b)
    return xp.einsum("hwir,ro->hwio", a, b[0, 0])


def merge(
    params: Mapping[str, Any], adapters: Mapping[str, Any], scale: float | Mapping[tuple[str, ...], float]
) -> dict[str, Any]:
    """The UNet ``params`` with each adapted kernel W replaced by W + scale * delta, in W's dtype.

    ``scale``: one for every adapter, or {module path: scale}. Works on numpy arrays (on the host, in
    float32) and on jax arrays (under jit: the gradient reaches the adapters). Leaves no adapter
    touches are the same objects as in ``params``.
    """
    pairs = _pairs(adapters)

    def walk(tree, path):
        out = {}
        for name, value in tree.items():
            if isinstance(value, Mapping):
                out[name] = walk(value, path + (name,))
            elif name == "kernel" and path in pairs:
                s = scale if isinstance(scale, (int, float)) else scale[path]
                a, b = pairs[path]
                d = delta(a.astype(np.float32), b.astype(np.float32))
                out[name] = (value.astype(np.float32) + s * d).astype(value.dtype)
            else:
                out[name] = value
        return out

    missing = [".".join(p) for p in pairs if p not in _kernels(params)]
    if missing:
        raise weights.WeightsMismatchError(
            f"{len(missing)} adapters have no kernel in the UNet (e.g. {', '.join(missing[:3])}): the adapters "
            "belong to another model"
        )
    return walk(params, ())


def count(adapters: Mapping[str, Any]) -> int:
    """The number of adapter parameters."""
    return sum(int(np.size(x)) for x in jax.tree.leaves(adapters))


# ---------------------------------------------------------------------------------------------
# LoRA files


def save(adapters: Mapping[str, Any], lora: LoraSpec, path: Path, fmt: str = "diffusers") -> None:
    """Write ``adapters`` as a float32 safetensors LoRA file that diffusers' ``load_lora_weights`` reads.

    "diffusers": ``unet.<module>.lora_A.weight`` / ``lora_B.weight`` with the LoraConfig (r,
    lora_alpha, target_modules) in the metadata, as ``save_lora_weights`` writes them. "kohya":
    ``lora_unet_<module with _>.lora_down.weight`` / ``lora_up.weight`` / ``alpha``, as the
    authors' training script converts them.
    """
    state = {k: np.asarray(v, np.float32) for k, v in weights.params_to_state_dict(adapters).items()}
    if fmt == "diffusers":
        modules = sorted(".".join(p) for p in _pairs(adapters))
        config = {"unet.r": lora.rank, "unet.lora_alpha": lora.alpha, "unet.target_modules": modules}
        tensors = {f"unet.{key}": value for key, value in state.items()}
        weights.save_safetensors(tensors, path, metadata={METADATA_KEY: json.dumps(config, sort_keys=True)})
    elif fmt == "kohya":
        tensors = {}
        for key, value in state.items():
            module, _, leaf = key.rpartition(".lora_")
            stem = KOHYA_PREFIX + module.replace(".", "_")
            tensors[f"{stem}.{'lora_down' if leaf.startswith('A') else 'lora_up'}.weight"] = value
            tensors[f"{stem}.alpha"] = np.asarray(lora.alpha, np.float32)
        weights.save_safetensors(tensors, path)
    else:
        raise ValueError(f"LoRA format {fmt!r}: use one of {', '.join(FORMATS)}")


def read(path: Path, unet_params: Mapping[str, Any]) -> tuple[dict[str, Any], dict[tuple[str, ...], float]]:
    """(adapters, {module path: lora_alpha / r}) of a UNet LoRA file, diffusers/peft or kohya layout.

    The alphas come from the file (kohya's ``alpha`` tensors, diffusers' metadata); without them a
    module's alpha is its rank (scale 1), as diffusers assumes. Raises WeightsFileError for an
    unreadable file and WeightsMismatchError, naming keys, for keys that match no module of
    ``unet_params`` or adapters whose shapes do not fit it.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        handle = safe_open(str(path), framework="numpy")
    except (SafetensorError, OSError) as error:
        raise weights.WeightsFileError(f"LoRA file {path} cannot be read ({error}): give a .safetensors file") from None
    kernels = _kernels(unet_params)
    by_name = {".".join(p): p for p in kernels}
    by_kohya = {KOHYA_PREFIX + name.replace(".", "_"): p for name, p in by_name.items()}
    roles = {"lora_down.weight": "A", "lora_up.weight": "B", "alpha": "alpha", "A.weight": "A", "B.weight": "B"}
    found: dict[tuple[str, ...], dict[str, np.ndarray]] = {}
    unmatched = []
    for key in handle.keys():
        if key.startswith(KOHYA_PREFIX):
            stem, _, leaf = key.partition(".")
            module = by_kohya.get(stem)
        else:
            name = next((key[len(p) :] for p in PEFT_PREFIXES if key.startswith(p)), key)
            stem, _, leaf = name.rpartition(".lora_")
            module = by_name.get(stem)
        if module is None or leaf not in roles:
            unmatched.append(key)
            continue
        found.setdefault(module, {})[roles[leaf]] = handle.get_tensor(key)
    if unmatched:
        raise weights.WeightsMismatchError(
            f"LoRA file {path}: {len(unmatched)} of its keys match no module of this UNet (e.g. "
            f"{', '.join(unmatched[:3])}): give a UNet LoRA of this model's architecture (SD1.x, SD2.x or SDXL) in "
            "the diffusers/peft or kohya layout with diffusers' module names"
        )
    incomplete = [".".join(p) for p, parts in found.items() if not {"A", "B"} <= parts.keys()]
    if incomplete:
        raise weights.WeightsMismatchError(
            f"LoRA file {path} has only one of lora_A / lora_B (lora_down / lora_up) for {len(incomplete)} modules "
            f"(e.g. {', '.join(incomplete[:3])}): the file is incomplete"
        )
    alphas = _metadata_alphas(handle.metadata() or {}, path)
    state, template, scales, misshaped = {}, {}, {}, []
    for module, parts in found.items():
        a, b = parts["A"], parts["B"]
        rank = a.shape[0]
        a_shape, b_shape = _adapter_shapes(tuple(kernels[module].shape), rank)
        name = ".".join(module)
        torch_a = (rank, a_shape[0]) if len(a_shape) == 2 else (rank, a_shape[2], a_shape[0], a_shape[1])
        torch_b = (b_shape[1], rank) if len(b_shape) == 2 else (b_shape[3], rank, 1, 1)
        if a.shape != torch_a or b.shape != torch_b:
            misshaped.append(f"{name} ({a.shape} and {b.shape}, expected {torch_a} and {torch_b})")
            continue
        state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"] = a, b
        template[module + ("lora_A", "kernel")] = jax.ShapeDtypeStruct(a_shape, a.dtype)
        template[module + ("lora_B", "kernel")] = jax.ShapeDtypeStruct(b_shape, b.dtype)
        alpha = float(parts["alpha"]) if "alpha" in parts else alphas(name, rank)
        scales[module] = alpha / rank
    if misshaped:
        raise weights.WeightsMismatchError(
            f"LoRA file {path}: {len(misshaped)} adapters do not fit this UNet's kernels (e.g. "
            f"{'; '.join(misshaped[:2])}): give a LoRA of this model's architecture"
        )
    return weights.state_dict_to_params(state, _nest(template), name="LoRA"), scales


def _metadata_alphas(metadata: Mapping[str, str], path: Path):
    """name, rank -> lora_alpha from diffusers' adapter metadata (its alpha_pattern first); the rank without it."""
    if METADATA_KEY not in metadata:
        return lambda name, rank: float(rank)
    try:
        config = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as error:
        raise weights.WeightsFileError(f"LoRA file {path}: its {METADATA_KEY} is not JSON ({error.msg})") from None
    config = {k.removeprefix("unet."): v for k, v in config.items()}
    pattern = config.get("alpha_pattern") or {}

    def alpha(name: str, rank: int) -> float:
        for key, value in pattern.items():
            if name == key or name.endswith("." + key):
                return float(value)
        return float(config.get("lora_alpha", rank))

    return alpha


def parse_file_arg(text: str) -> tuple[Path, float]:
    """``FILE[:SCALE]`` (the --lora flags) -> (file, scale, default 1); WeightsFileError for a missing file."""
    stem, colon, tail = text.rpartition(":")
    try:
        path, scale = (Path(stem), float(tail)) if colon else (Path(text), 1.0)
    except ValueError:
        path, scale = Path(text), 1.0
    if not path.is_file():
        raise weights.WeightsFileError(f"--lora {path} does not exist: give a LoRA .safetensors file, FILE[:SCALE]")
    if not math.isfinite(scale):
        raise weights.WeightsFileError(f"--lora {text}: the scale {scale} is not finite: give a number, e.g. FILE:0.8")
    return path, scale


def merge_files(unet_params: Mapping[str, Any], loras: Sequence[tuple[Path, float]]) -> dict[str, Any]:
    """The UNet ``unet_params`` (numpy) with each (LoRA file, scale) of ``loras`` merged in, in order."""
    for path, scale in loras:
        adapters, scales = read(path, unet_params)
        unet_params = merge(unet_params, adapters, {module: scale * s for module, s in scales.items()})
    return unet_params
