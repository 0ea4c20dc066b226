"""``python -m perflow_jax.convert``: a diffusers pipeline folder (PyTorch) -> Flax parameters (Orbax).

    python -m perflow_jax.convert --from DIFFUSERS_DIR|ORG/NAME[@REVISION] --out DIR [--dtype float32|bfloat16]
        [--perflow-delta delta_weights.safetensors [--perflow-parameterization diff_eps] [--perflow-windows 4]]
        [--lora FILE[:SCALE] ...] [--variant fp16] [--overwrite]

DIR then holds, for each network (unet, vae, text_encoder, text_encoder_2 for SDXL), its
``config.json`` and an Orbax checkpoint of its parameters in ``params/``; the tokenizer folders
and the scheduler config are copied; ``perflow_model.json`` records what was converted. Later
commands load DIR without torch (``perflow_jax.weights.read_component``).

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
may not be, hold or lie inside DIFFUSERS_DIR or the delta file.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from perflow_jax import __version__, console, hub, models, pipeline, schedule, weights
from perflow_jax.lora import merge_files, parse_file_arg


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
    variant: str | None = None,
    overwrite: bool = False,
    log: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """Convert a diffusers pipeline folder (or hub id ORG/NAME[@REVISION]) into a converted folder ``out``;
    returns the manifest."""
    out = Path(out)
    if dtype not in ("float32", "bfloat16"):
        raise ConversionError(f"--dtype {dtype!r} is not supported: use float32 or bfloat16")
    loras = [parse_file_arg(arg) for arg in lora]
    inputs = {"--from": source, "--perflow-delta": perflow_delta, **{f"--lora {p}": p for p, _ in loras}}
    weights.check_out(out, inputs, ConversionError)
    if not overwrite:
        weights.require_empty(out, ConversionError, "choose another --out or pass --overwrite")
    if hub.is_hub_id(source):
        source, origin = hub.download_pipeline(str(source), variant, ConversionError, log)
    else:
        source = Path(source)
        origin = str(source.resolve())
    components = weights.read_model_index(source)
    delta = weights.read_delta(perflow_delta) if perflow_delta else None
    if delta is not None:
        schedule.check_parameterization(perflow_parameterization)
        if perflow_windows < 1:
            raise ConversionError(
                f"--perflow-windows {perflow_windows}: give the delta's window count K (4 for the releases)"
            )

    staging = weights.staging_folder(out, log)
    start = time.perf_counter()
    try:
        counts = {}
        for name in (n for n in weights.PIPELINE_NETWORKS if n in components):
            loaded = (delta, loras) if name == "unet" else (None, ())
            counts[name] = _convert_network(source, staging, name, components[name], dtype, variant, *loaded, log)
        for name in (n for n in weights.PIPELINE_COPIED if n in components):
            shutil.copytree(source / name, staging / name)
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
            "components": components,
            "parameters": counts,
        }
        (staging / weights.CONVERTED_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
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


def _convert_network(source, staging, name, class_name, dtype, variant, delta, loras, log) -> int:
    start = time.perf_counter()
    config = weights.read_json(source / name / "config.json")
    try:
        module = models.from_config(class_name, config)
    except ValueError as error:
        raise ConversionError(f"{source / name / 'config.json'}: {error}") from error
    state = weights.read_state_dict(source / name, variant)
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
        "--from", dest="source", required=True, help="diffusers pipeline folder, or hub id ORG/NAME[@REVISION]"
    )
    parser.add_argument("--out", type=Path, required=True, help="folder to write (must be empty or absent)")
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
    parser.add_argument("--variant", help="weight file variant to read, e.g. fp16 (default: plain files)")
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
