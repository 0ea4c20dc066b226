"""Single-file Stable Diffusion checkpoints, in the original (LDM) layout that A1111, ComfyUI and
kohya read and write: ``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (VAE),
``cond_stage_model.*`` or ``conditioner.embedders.N.*`` (text encoders), and ``model_ema.*``.

Reading (``convert --from FILE --base DIFFUSERS_DIR``) maps the file's keys to diffusers' with
diffusers' own single-file conversion functions (``diffusers.loaders.single_file_utils``), network
by network, given the base folder's configs; the state dicts then take the path a diffusers
folder's take. It needs torch and diffusers. Writing (``export --single-file``) is the inverse
mapping, numpy only (exporting needs no torch); tests check that diffusers' ``from_single_file``
reads what it writes back to the same tensors.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from perflow_jax import weights

SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
EMA_PREFIX = "model_ema."
# diffusers' rule: a file holds EMA weights beside the others when this many keys are EMA keys.
EMA_MIN_KEYS = 100

# Where each network of the three released architectures sits in a single file. A text encoder prefix
# ending in "transformer." holds OpenAI CLIP under transformers' key names; one ending in "model." is
# OpenCLIP, with its own names and q/k/v fused.
LAYOUTS = {
    "sd15": {
        "unet": "model.diffusion_model.",
        "vae": "first_stage_model.",
        "text_encoder": "cond_stage_model.transformer.",
    },
    "sd21": {"unet": "model.diffusion_model.", "vae": "first_stage_model.", "text_encoder": "cond_stage_model.model."},
    "sdxl": {
        "unet": "model.diffusion_model.",
        "vae": "first_stage_model.",
        "text_encoder": "conditioner.embedders.0.transformer.",
        "text_encoder_2": "conditioner.embedders.1.model.",
    },
}
# One key each network prefix of a layout always has, to say what a file lacks.
MARKERS = {
    "model.diffusion_model.": "input_blocks.0.0.weight",
    "first_stage_model.": "encoder.conv_in.weight",
    "transformer.": "text_model.embeddings.token_embedding.weight",
    "model.": "token_embedding.weight",
}
ARCHITECTURES = {768: "sd15", 1024: "sd21", 2048: "sdxl"}  # cross-attention width -> architecture
CROSS_ATTENTION_KEY = re.compile(r"model\.diffusion_model\..*\.attn2\.to_k\.weight")


def is_single_file(source: str | Path) -> bool:
    """Whether ``--from`` names a checkpoint file rather than a folder or hub id."""
    return Path(source).is_file() and Path(source).suffix in SUFFIXES


def read_checkpoint(path: Path) -> Mapping[str, Any]:
    """The file's tensors as torch tensors: safetensors read lazily, pickles with ``weights_only=True`` only."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return weights.SafetensorsStateDict([path], framework="pt")
    return weights.load_torch_pickle(path)


def _prefix_marker(prefix: str) -> str:
    return prefix + next(marker for end, marker in MARKERS.items() if prefix.endswith(end))


def check_layout(
    path: Path, checkpoint: Mapping[str, Any], unet_config: Mapping[str, Any], expected: str, error: type[Exception]
) -> None:
    """Raise ``error`` unless ``checkpoint`` is an original-layout file whose UNet fits ``unet_config``.

    ``expected`` names where the config came from ("--config sd15", "--base DIR") for the message.
    A file with no UNet key is named with the closest layout and that layout's keys it lacks; a UNet of
    another cross-attention width (e.g. SDXL's 2048 for SD1.5's 768) with the first such key's shape.
    """
    keys = list(checkpoint)
    if not any(key.startswith(LAYOUTS["sd15"]["unet"]) for key in keys):
        markers = {name: [_prefix_marker(p) for p in layout.values()] for name, layout in LAYOUTS.items()}
        closest = max(markers, key=lambda name: sum(m in checkpoint for m in markers[name]))
        missing = [m for m in markers[closest] if m not in checkpoint]
        raise error(
            f"{path} matches no known single-file layout: the closest is {closest}, which lacks "
            f"{', '.join(missing)} (the file's first keys: {', '.join(keys[:3]) or 'none'}); give an original-layout "
            "(LDM / A1111 / kohya) checkpoint, or a diffusers folder as --from"
        )
    key = next((key for key in keys if CROSS_ATTENTION_KEY.fullmatch(key)), None)
    width = unet_config.get("cross_attention_dim")
    if key is not None and tuple(checkpoint[key].shape)[1] != width:
        shape = tuple(checkpoint[key].shape)
        other = ARCHITECTURES.get(shape[1])
        fix = f"use --config {other} or a --base of that architecture" if other else "give a --base of its architecture"
        raise error(
            f"{path} does not fit {expected}: {key} is {shape}, cross-attention width {shape[1]}"
            f"{f' ({other})' if other else ''}, but the UNet config has {width}: {fix}"
        )


def has_ema(checkpoint: Mapping[str, Any]) -> bool:
    return sum(key.startswith(EMA_PREFIX) for key in checkpoint) > EMA_MIN_KEYS


def network_state(
    checkpoint: Mapping[str, Any], name: str, config: Mapping[str, Any], *, ema: bool = False
) -> dict[str, np.ndarray] | None:
    """Network ``name``'s diffusers state dict (numpy) from an original-layout ``checkpoint``, or None if the
    file lacks it. ``config``: the network's diffusers config; ``ema``: the UNet's ``model_ema.*`` weights."""
    from diffusers.loaders import single_file_utils as sf

    prefix = next((p for p in _prefixes(name) if any(key.startswith(p) for key in checkpoint)), None)
    if prefix is None:
        return None
    if name == "unet":
        state = sf.convert_ldm_unet_checkpoint(checkpoint, dict(config), extract_ema=ema)
    elif name == "vae":
        state = sf.convert_ldm_vae_checkpoint(checkpoint, dict(config))
    elif prefix.endswith("transformer."):
        state = sf.convert_ldm_clip_checkpoint({k: checkpoint[k] for k in checkpoint if k.startswith(prefix)})
    else:
        text_model = SimpleNamespace(config=SimpleNamespace(hidden_size=config["hidden_size"]))
        state = sf.convert_open_clip_checkpoint(text_model, checkpoint, prefix=prefix)
    return {key: weights.torch_to_numpy(value) for key, value in state.items()}


def _prefixes(name: str) -> list[str]:
    return list(dict.fromkeys(layout[name] for layout in LAYOUTS.values() if name in layout))


# ---------------------------------------------------------------------------------------------
# Writing: diffusers key names -> original ones, the inverse of diffusers' single-file conversion.

RESNET_NAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}
VAE_ATTENTION_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
OPEN_CLIP_NAMES = (
    ("text_model.embeddings.token_embedding.weight", "token_embedding.weight"),
    ("text_model.embeddings.position_embedding.weight", "positional_embedding"),
    ("text_model.final_layer_norm.", "ln_final."),
    ("text_model.encoder.layers.", "transformer.resblocks."),
    (".layer_norm1.", ".ln_1."),
    (".layer_norm2.", ".ln_2."),
    (".mlp.fc1.", ".mlp.c_fc."),
    (".mlp.fc2.", ".mlp.c_proj."),
    (".self_attn.out_proj.", ".attn.out_proj."),
)


def layout_of(configs: Mapping[str, Mapping[str, Any]]) -> str:
    """The architecture of a pipeline's networks ({name: diffusers config}): SDXL has two text encoders;
    SD2's (OpenCLIP) uses gelu where SD1's (OpenAI CLIP) uses quick_gelu."""
    if "text_encoder_2" in configs:
        return "sdxl"
    text = configs.get("text_encoder")
    return "sd21" if text is not None and text.get("hidden_act") == "gelu" else "sd15"


def original_state_dict(
    states: Mapping[str, Mapping[str, np.ndarray]], configs: Mapping[str, Mapping[str, Any]]
) -> dict[str, np.ndarray]:
    """One original-layout state dict from networks' diffusers state dicts ({name: state}, the UNet at
    least) and their diffusers ``configs``."""
    layout = LAYOUTS[layout_of(configs)]
    out = {}
    for name, state in states.items():
        prefix = layout[name]
        if name == "unet":
            renamed = {_unet_key(key, configs["unet"]): value for key, value in state.items()}
        elif name == "vae":
            renamed = {_vae_key(key, configs["vae"]): _vae_value(key, value) for key, value in state.items()}
        elif prefix.endswith("transformer."):
            renamed = {key if key.startswith("text_model.") else "text_model." + key: v for key, v in state.items()}
        else:
            renamed = _open_clip_state(state)
        out.update({prefix + key: value for key, value in renamed.items()})
    return out


def _unet_key(key: str, config: Mapping[str, Any]) -> str:
    """'down_blocks.1.resnets.0.norm1.weight' -> 'input_blocks.4.0.in_layers.0.weight' (2 layers per block)."""
    n = config["layers_per_block"] + 1  # input / output blocks per level: the layers and a down- or upsampler
    if match := re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        side, level, kind, j, rest = match.groups()
        index = int(level) * n + int(j) + (1 if side == "down" else 0)
        blocks = "input_blocks" if side == "down" else "output_blocks"
        return f"{blocks}.{index}.0.{_resnet(rest)}" if kind == "resnets" else f"{blocks}.{index}.1.{rest}"
    if match := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{int(match[1]) * n + n}.0.op.{match[2]}"
    if match := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        level = int(match[1])
        after = 2 if "CrossAttn" in config["up_block_types"][level] else 1  # after the resnet (and attention)
        return f"output_blocks.{level * n + n - 1}.{after}.conv.{match[2]}"
    if match := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(match[1])}.{_resnet(match[2])}"
    if match := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{match[1]}"
    module, _, leaf = key.rpartition(".")
    if module in UNET_TOP:
        return f"{UNET_TOP[module]}.{leaf}"
    raise ValueError(f"UNet parameter {key} has no name in the original single-file layout")


def _resnet(rest: str) -> str:
    module, _, leaf = rest.partition(".")
    return f"{RESNET_NAMES[module]}.{leaf}"


def _vae_key(key: str, config: Mapping[str, Any]) -> str:
    """'decoder.up_blocks.0.resnets.1.conv1.weight' -> 'decoder.up.3.block.1.conv1.weight' (4 levels)."""
    levels = len(config["up_block_types"])
    key = key.replace("conv_shortcut", "nin_shortcut")
    if match := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.(resnets|downsamplers)\.(\d+)\.(.+)", key):
        level, kind, j, rest = match.groups()
        return (
            f"encoder.down.{level}.block.{j}.{rest}" if kind == "resnets" else f"encoder.down.{level}.downsample.{rest}"
        )
    if match := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.(resnets|upsamplers)\.(\d+)\.(.+)", key):
        level, kind, j, rest = match.groups()
        level = levels - 1 - int(level)  # the original counts decoder levels from the lowest resolution
        return f"decoder.up.{level}.block.{j}.{rest}" if kind == "resnets" else f"decoder.up.{level}.upsample.{rest}"
    if match := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{match[1]}.mid.block_{int(match[2]) + 1}.{match[3]}"
    if match := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
        return f"{match[1]}.mid.attn_1.{VAE_ATTENTION_NAMES[match[2]]}.{match[3]}"
    return key.replace("conv_norm_out", "norm_out")


def _vae_value(key: str, value: np.ndarray) -> np.ndarray:
    """The VAE's mid-block attention projections are 1x1 convolutions in the original: [C, C] -> [C, C, 1, 1]."""
    return value[:, :, None, None] if ".attentions." in key and np.ndim(value) == 2 else value


def _open_clip_state(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """transformers' CLIP text model -> OpenCLIP's names, q/k/v fused into in_proj, text_projection transposed."""
    out = {}
    for key, value in state.items():
        key = key if key.startswith(("text_model.", "text_projection")) else "text_model." + key
        if key == "text_projection.weight":
            out["text_projection"] = np.ascontiguousarray(value.T)
            continue
        if match := re.fullmatch(r"(.+)\.self_attn\.([qkv])_proj\.(weight|bias)", key):
            if match[2] == "q":
                fused = [_state_key(state, f"{match[1]}.self_attn.{p}_proj.{match[3]}") for p in "qkv"]
                out[_open_clip_key(f"{match[1]}.attn.in_proj_{match[3]}")] = np.concatenate(fused)
            continue
        out[_open_clip_key(key)] = value
    return out


def _state_key(state: Mapping[str, np.ndarray], key: str) -> np.ndarray:
    """``state[key]``, for a key with or without its ``text_model.`` prefix."""
    return state[key] if key in state else state[key.removeprefix("text_model.")]


def _open_clip_key(key: str) -> str:
    for new, old in OPEN_CLIP_NAMES:
        key = key.replace(new, old)
    return key


def save(path: Path, state: Mapping[str, np.ndarray], dtype: str) -> None:
    """Write an original-layout state dict as one safetensors file in ``dtype`` (a key of weights.DTYPES)."""
    target = np.dtype(weights.DTYPES[dtype])
    weights.save_safetensors({k: np.asarray(v).astype(target, copy=False) for k, v in state.items()}, path)


EXPORT_FILE = "perflow_single_file.safetensors"


def write_export(
    path: Path, unet_params: Any, unet_config: Mapping[str, Any], base: Path | None, dtype: str
) -> list[str]:
    """Write ``export --single-file``'s file: the UNet ``unet_params`` and, with a ``base`` diffusers folder,
    its VAE and text encoders, in ``dtype``. Returns the networks written."""
    from perflow_jax import pipeline

    states, configs = {"unet": weights.params_to_state_dict(unet_params)}, {"unet": unet_config}
    if base is not None:
        names = tuple(n for n in weights.read_model_index(base) if n in weights.PIPELINE_NETWORKS and n != "unet")
        model = pipeline.load_model(base, networks=names)
        for name in names:
            states[name], configs[name] = weights.params_to_state_dict(model.params[name]), model.configs[name]
    save(path, original_state_dict(states, configs), dtype)
    return list(states)
