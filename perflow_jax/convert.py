"""``python -m perflow_jax.convert``: a diffusers pipeline folder (PyTorch) -> Flax parameters (Orbax).

    python -m perflow_jax.convert --from DIFFUSERS_DIR|ORG/NAME[@REVISION] --out DIR [--dtype float32|bfloat16]
        [--perflow-delta delta_weights.safetensors [--perflow-parameterization diff_eps] [--perflow-windows 4]]
        [--lora FILE[:SCALE] ...] [--controlnet CONTROLNET_DIR[:NAME] ...] [--variant fp16] [--overwrite]
    python -m perflow_jax.convert --from MODEL.safetensors|MODEL.ckpt --base DIFFUSERS_DIR [--config sd15|sd21|sdxl]
        [--ema|--no-ema] --out DIR [...]

DIR then holds, for each network (unet, vae, text_encoder, text_encoder_2 for SDXL), its
``config.json`` and an Orbax checkpoint of its parameters in ``params/``; the tokenizer folders
and the scheduler config are copied; ``perflow_model.json`` records what was converted. Later
commands load DIR without torch (``perflow_jax.weights.read_component``).

A ``--from`` that is one file (``.safetensors``, or ``.ckpt`` / ``.pt`` / ``.bin`` read with
``weights_only=True`` only) is a single-file checkpoint in the original layout (A1111, ComfyUI,
kohya; ``perflow_jax.single_file``): its UNet, VAE and text encoders are converted with the
configs of ``--base`` (a diffusers folder or hub id of the same architecture), which also gives
the tokenizers, the scheduler and any network the file lacks. The UNet is the file's EMA weights
when it holds both (``--no-ema`` for the others). ``--config`` checks the file against a released
architecture. The manifest records which weights were used.

With ``--controlnet`` (repeatable) each diffusers ControlNet folder (``ControlNetModel.save_pretrained``'s:
config.json and its weights) is converted into ``DIR/controlnet/NAME/`` (NAME: the folder's name, or
the one after a colon), for ``python -m perflow_jax.sample --control IMAGE --controlnet NAME``. A
ControlNet of another base architecture than the UNet's (e.g. cross_attention_dim 768 vs 1024, an
SD1.5 ControlNet for SD2.1) is refused, naming the dimensions that differ.

A ``--from`` that is no local path but reads as a Hugging Face Hub id (``ORG/NAME``, optionally
``@REVISION``) is downloaded first, only the files conversion reads and one ``--variant``, through
huggingface_hub's cache (HF_HOME, HF_HUB_OFFLINE and HF_TOKEN apply; ``perflow_jax.hub``).

With ``--perflow-delta`` (the authors' released ``delta_weights.safetensors``, or one exported by
``python -m perflow_jax.export``) the UNet is the teacher plus the delta, a PeRFlow student, and
the scheduler config becomes the PeRFlowScheduler's (the teacher's betas, the delta's
parameterization and window count: the released SD1.5 delta is ``diff_eps`` with 4 windows, the
defaults), so that ``python -m perflow_jax.sample`` samples DIR as the student it is.

With ``--lora`` (repeatable) each UNet LoRA file (diffusers/peft or kohya layout, e.g. a style
LoRA, a released PeRFlow LoRA or one exported by ``python -m perflow_jax.export``) is merged into
the UNet in order, each at its own alpha / r times SCALE (default 1); keys that match no module of
the UNet are an error naming them.

Nothing partial is written: the conversion happens in a hidden folder beside DIR that replaces
DIR only once everything succeeded (one left by a killed conversion goes with the next one). DIR
may not be, hold or lie inside DIFFUSERS_DIR or the delta file. DIR may be a ``gs://`` URL: the
conversion is then written to a local temporary folder and copied up, ``perflow_model.json`` last
(a folder without it is no converted folder to the commands that read one).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from etils import epath

from perflow_jax import __version__, console, hub, models, paths, pipeline, schedule, single_file, weights
from perflow_jax.lora import merge_files, parse_file_arg
from perflow_jax.models import reference_configs

# --config: the UNet of each released architecture, to check a single file against.
REFERENCE_UNETS = {
    "sd15": reference_configs.SD15_UNET,
    "sd21": reference_configs.SD21_UNET,
    "sdxl": reference_configs.SDXL_UNET,
}


class ConversionError(ValueError):
    """The source folder, the delta weights or the output folder do not allow a conversion."""


def convert(
    source: Path | str,
    out: Path,
    *,
    dtype: str = "float32",
    perflow_delta: Path | None = None,
    perflow_parameterization: str = "diff_eps",
    perflow_windows: int = 4,
    lora: Sequence[str] = (),
    controlnet: Sequence[str] = (),
    variant: str | None = None,
    base: Path | str | None = None,
    config: str | None = None,
    ema: bool | None = None,
    overwrite: bool = False,
    log: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """Convert a diffusers pipeline folder (or hub id ORG/NAME[@REVISION]), or a single-file checkpoint with
    the configs of ``base``, into a converted folder ``out``; returns the manifest.

    Single files only: ``config`` ("sd15", "sd21", "sdxl") checks the file's architecture; ``ema`` chooses
    the UNet's EMA (True) or other (False) weights, default EMA when the file has both.
    """
    remote = paths.is_url(out)
    out = epath.Path(out) if remote else Path(out)
    if dtype not in ("float32", "bfloat16"):
        raise ConversionError(f"--dtype {dtype!r} is not supported: use float32 or bfloat16")
    loras = [parse_file_arg(arg) for arg in lora]
    controlnets = _controlnet_args(controlnet)
    inputs = {
        "--from": source,
        "--base": base,
        "--perflow-delta": perflow_delta,
        **{f"--lora {p}": p for p, _ in loras},
        **{f"--controlnet {p}": p for p in controlnets.values()},
    }
    if not remote:
        weights.check_out(out, inputs, ConversionError)
    if not overwrite:
        weights.require_empty(out, ConversionError, "choose another --out or pass --overwrite")
    checkpoint, single = None, {}
    if single_file.is_single_file(source):
        checkpoint, source, single = _read_single_file(Path(source), base, config, ema, variant, log)
        origin = single["file"]
    elif base is not None or config is not None or ema is not None:
        raise ConversionError(
            f"--base, --config and --ema / --no-ema are for a single-file --from (.safetensors, .ckpt), but {source} "
            "is a folder or hub id: leave them out"
        )
    elif hub.is_hub_id(source):
        source, origin = hub.download_pipeline(str(source), variant, ConversionError, log)
    else:
        source = Path(source)
        origin = str(source.resolve())
    components = weights.read_model_index(source)

    def read_state(name: str, network_config: dict[str, Any]):
        state = None
        if checkpoint is not None:
            state = single_file.network_state(checkpoint, name, network_config, ema=name == "unet" and single["ema"])
            if state is None:
                single["from_base"].append(name)
        return state if state is not None else weights.read_state_dict(source / name, variant)

    base_configs = [weights.read_json(source / name / "config.json") for name in ("unet", "vae")]
    controlnet_configs = {name: _controlnet_config(folder, *base_configs) for name, folder in controlnets.items()}
    delta = weights.read_delta(perflow_delta) if perflow_delta else None
    if delta is not None:
        schedule.check_parameterization(perflow_parameterization)
        if perflow_windows < 1:
            raise ConversionError(
                f"--perflow-windows {perflow_windows}: give the delta's window count K (4 for the releases)"
            )

    staging = Path(tempfile.mkdtemp(prefix="perflow_convert-")) if remote else weights.staging_folder(out, log)
    start = time.perf_counter()
    try:
        counts = {}
        for name in (n for n in weights.PIPELINE_NETWORKS if n in components):
            loaded = (delta, loras) if name == "unet" else (None, ())
            counts[name] = _convert_network(source, staging, name, components[name], dtype, read_state, *loaded, log)
        for name in (n for n in weights.PIPELINE_COPIED if n in components):
            shutil.copytree(source / name, staging / name)
        for name, folder in controlnets.items():
            _convert_controlnet(folder, staging, name, controlnet_configs[name], dtype, log)
        if delta is not None:
            components = {**components, "scheduler": pipeline.PERFLOW_SCHEDULER}
            teacher = weights.read_json(source / "scheduler" / "scheduler_config.json")
            student = pipeline.perflow_scheduler_config(teacher, perflow_parameterization, perflow_windows)
            (staging / "scheduler" / "scheduler_config.json").write_text(json.dumps(student, indent=2) + "\n")
        manifest = {
            "format": "perflow_jax converted model",
            "format_version": 1,
            "perflow_jax_version": __version__,
            "source": origin,
            "dtype": dtype,
            "variant": variant,
            "perflow_delta": str(Path(perflow_delta).resolve()) if perflow_delta else None,
            "loras": [[str(path.resolve()), scale] for path, scale in loras],
            "controlnets": {name: str(folder.resolve()) for name, folder in controlnets.items()},
            **({"single_file": single} if single else {}),
            "components": components,
            "parameters": counts,
        }
        manifest_text = json.dumps(manifest, indent=2) + "\n"
        if remote:  # an object store renames no folder: the files are copied up, the manifest last
            paths.upload(staging, out)
            (out / weights.CONVERTED_MANIFEST).write_text(manifest_text)
            shutil.rmtree(staging)
        else:
            (staging / weights.CONVERTED_MANIFEST).write_text(manifest_text)
            weights.replace_folder(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    copied = ", ".join(n for n in weights.PIPELINE_COPIED if n in components)
    log(
        f"converted {len(counts)} networks ({_count(sum(counts.values()))} parameters, {dtype}) and copied "
        f"{copied} to {out} in {time.perf_counter() - start:.1f} s"
    )
    return manifest


def _read_single_file(path: Path, base, config: str | None, ema: bool | None, variant: str | None, log):
    """(the file's tensors, the base folder, the manifest's "single_file" entry) of a single-file --from,
    after checking its layout and architecture against --config and --base."""
    if base is None and config is None:
        raise ConversionError(
            f"--from {path} is a single-file checkpoint: add --base DIFFUSERS_DIR (or hub id), a diffusers folder of "
            "its architecture, for its configs, tokenizers and scheduler"
        )
    checkpoint = single_file.read_checkpoint(path)
    if config is not None:
        single_file.check_layout(path, checkpoint, REFERENCE_UNETS[config], f"--config {config}", ConversionError)
    if base is None:
        raise ConversionError(
            f"--config {config} gives the networks' configs but not the tokenizer files (tokenizer/vocab.json, "
            "tokenizer/merges.txt) or the scheduler config, which cannot be had offline: add --base DIFFUSERS_DIR, "
            f"a diffusers folder (or hub id) of the {config} architecture"
        )
    if hub.is_hub_id(base):
        base, _ = hub.download_pipeline(str(base), variant, ConversionError, log)
    base = Path(base)
    weights.read_model_index(base)  # a diffusers folder, or a one-line error
    unet_config = weights.read_json(base / "unet" / "config.json")
    single_file.check_layout(path, checkpoint, unet_config, f"--base {base}", ConversionError)
    both = single_file.has_ema(checkpoint)
    if ema and not both:
        raise ConversionError(f"--ema: {path} holds no EMA weights ({single_file.EMA_PREFIX}*): leave --ema out")
    ema = both if ema is None else ema
    choice = "; it holds both: choose with --ema / --no-ema" if both else ""
    log(f"{path}: UNet from its {'EMA' if ema else 'non-EMA'} weights{choice}")
    entry = {"file": str(path.resolve()), "base": str(base.resolve()), "ema": ema, "from_base": []}
    return checkpoint, base, entry


def _convert_network(folder, staging, name, class_name, dtype, read_state, delta, loras, log) -> int:
    """Convert network ``name`` with the config in ``folder``; ``read_state(name, config)`` gives its state dict;
    ``delta`` and ``loras`` are merged into it (the UNet's)."""
    start = time.perf_counter()
    config = weights.read_json(folder / name / "config.json")
    try:
        module = models.from_config(class_name, config)
    except ValueError as error:
        raise ConversionError(f"{folder / name / 'config.json'}: {error}") from error
    state = read_state(name, config)
    if delta is not None:
        state = weights.DeltaAppliedStateDict(state, delta)
    params = weights.state_dict_to_params(state, module.abstract_params(), name=name)
    if loras:
        params = merge_files(weights.cast_params(params, "float32"), loras)
    params = weights.cast_params(params, dtype)
    weights.write_component(staging, name, class_name, config, params)
    count = sum(int(np.size(x)) for x in weights.flatten(params).values())
    extra = (" + PeRFlow delta" if delta is not None else "") + "".join(f" + LoRA {p.name}" for p, _ in loras)
    log(f"{name:<15} {class_name:<28} {_count(count):>8} parameters{extra}  {time.perf_counter() - start:6.1f} s")
    return count


def _controlnet_args(args: Sequence[str]) -> dict[str, Path]:
    """``DIR[:NAME]`` (the --controlnet flags) -> {NAME: DIR}, NAME defaulting to DIR's name."""
    controlnets = {}
    for arg in args:
        folder, colon, name = arg.rpartition(":")
        folder, name = (Path(folder), name) if colon and not Path(arg).exists() else (Path(arg), Path(arg).name)
        if not (folder / "config.json").is_file():
            raise ConversionError(
                f"--controlnet {folder} is not a diffusers ControlNet folder (no config.json): give the folder "
                "ControlNetModel.save_pretrained wrote, DIR[:NAME]"
            )
        if not pipeline.CONTROLNET_NAME.fullmatch(name):
            raise ConversionError(
                f"--controlnet {arg}: the name {name!r} is not a plain folder name: give one of letters, digits, "
                "'.', '_' and '-', as DIR:NAME"
            )
        if name in controlnets:
            raise ConversionError(f"--controlnet {arg}: the name {name!r} is given twice: name one of them DIR:NAME")
        controlnets[name] = folder
    return controlnets


def _controlnet_config(folder: Path, unet_config: dict[str, Any], vae_config: dict[str, Any]) -> dict[str, Any]:
    """The config of the ControlNet in ``folder``, checked to be a ControlNetModel of the model's architecture."""
    config = weights.read_json(folder / "config.json")
    if config.get("_class_name") != "ControlNetModel":
        raise ConversionError(
            f"--controlnet {folder} holds a {config.get('_class_name')}, not a ControlNetModel: give a diffusers "
            "ControlNet folder"
        )
    try:
        pipeline.check_controlnet_fits(config, unet_config, vae_config)
    except ValueError as error:
        raise ConversionError(f"--controlnet {folder}: {error}") from error
    return config


def _convert_controlnet(folder: Path, staging: Path, name: str, config: dict[str, Any], dtype: str, log) -> None:
    """The diffusers ControlNet in ``folder`` -> ``staging/controlnet/name``."""
    start = time.perf_counter()
    module = models.from_config("ControlNetModel", config)
    state = weights.read_state_dict(folder)
    params = weights.cast_params(weights.state_dict_to_params(state, module.abstract_params(), name=name), dtype)
    weights.write_component(staging, f"{pipeline.CONTROLNET_FOLDER}/{name}", "ControlNetModel", config, params)
    count = sum(int(np.size(x)) for x in weights.flatten(params).values())
    log(f"controlnet/{name:<15} {_count(count):>8} parameters  {time.perf_counter() - start:6.1f} s")


def _count(n: int) -> str:
    """1234567 -> '1.23 M'."""
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return str(n)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m perflow_jax.convert",
        description="Convert a diffusers Stable Diffusion folder (PyTorch) into Flax parameters (Orbax).",
    )
    parser.add_argument(
        "--from",
        dest="source",
        required=True,
        help="diffusers pipeline folder, hub id ORG/NAME[@REVISION], or single-file checkpoint (.safetensors, .ckpt)",
    )
    parser.add_argument("--out", required=True, help="folder or gs:// URL to write (must be empty or absent)")
    parser.add_argument(
        "--dtype", default="float32", choices=("float32", "bfloat16"), help="stored dtype (default float32)"
    )
    parser.add_argument("--perflow-delta", type=Path, help="PeRFlow delta_weights.safetensors to add to the UNet")
    parser.add_argument(
        "--perflow-parameterization",
        default="diff_eps",
        choices=schedule.PARAMETERIZATIONS,
        help="what the delta's student predicts (default, and the released SD1.5 delta: diff_eps)",
    )
    parser.add_argument("--perflow-windows", type=int, default=4, help="the delta's window count K (default 4)")
    parser.add_argument(
        "--lora", action="append", default=[], metavar="FILE[:SCALE]", help="a UNet LoRA to merge (repeatable)"
    )
    parser.add_argument(
        "--controlnet",
        action="append",
        default=[],
        metavar="DIR[:NAME]",
        help="a diffusers ControlNet folder to convert into controlnet/NAME (repeatable; NAME default DIR's name)",
    )
    parser.add_argument("--variant", help="weight file variant to read, e.g. fp16 (default: plain files)")
    parser.add_argument("--base", help="single file: diffusers folder or hub id for configs, tokenizers, scheduler")
    parser.add_argument(
        "--config", choices=tuple(REFERENCE_UNETS), help="single file: the released architecture it must have"
    )
    parser.add_argument(
        "--ema",
        action=argparse.BooleanOptionalAction,
        help="single file holding both: the UNet's EMA weights (default) or, with --no-ema, the others",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--verbose", action="store_true", help=console.VERBOSE_HELP)
    args = vars(parser.parse_args(argv))
    console.set_log_levels(args.pop("verbose"))
    try:
        convert(**args)  # the flags' names are convert's parameters
    except (ConversionError, weights.WeightsFileError, weights.WeightsMismatchError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
