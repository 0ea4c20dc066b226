"""``python -m perflow_jax.export --to-torch``: a trained PeRFlow student as diffusers folders.

    python -m perflow_jax.export --to-torch --model WORKDIR_OR_CONVERTED_DIR --out DIR
        [--step N] [--weights ema|student] [--dtype float16|bfloat16|float32]
        [--base DIFFUSERS_DIR] [--merge] [--lora-format diffusers|kohya] [--single-file] [--overwrite]
        [--push-to-hub ORG/NAME [--evaluation EVALUATE_DIR]]

DIR then holds:
- ``unet/``: ``config.json`` + ``diffusion_pytorch_model.safetensors``, for diffusers'
  ``UNet2DConditionModel.from_pretrained`` (in ``--dtype``, default float16);
- ``delta_weights.safetensors``: student minus teacher for every UNet key, flat, with diffusers'
  key names and in float32, as the authors release theirs (PERFLOW_SPEC.md "Delta weights"):
  ``perflow_jax.torch.merge_delta_weights`` or ``convert --perflow-delta`` add it to any SD UNet
  of the same architecture. The teacher is the run's ``config.model.path``; for a converted
  folder it is the ``--base`` UNet, and without one no delta is written;
- ``scheduler/scheduler_config.json``: the ``perflow_jax.torch.PeRFlowScheduler`` that samples the
  student (its parameterization, windows and the teacher's betas);
- with ``--base`` (a diffusers pipeline folder of the teacher's architecture): the rest of a
  pipeline (VAE, text encoders, tokenizers copied from the base) and a ``model_index.json``
  naming the PeRFlow scheduler, so that ``StableDiffusionPipeline`` (or the SDXL one)
  ``.from_pretrained(DIR)`` loads it once ``perflow_jax.torch`` is imported;
- with ``--single-file``: ``perflow_single_file.safetensors``, the student UNet (with ``--base``
  also the base's VAE and text encoders) as one original-layout checkpoint in ``--dtype``, the file
  A1111 / ComfyUI-style tools load (``perflow_jax.single_file``).

A LoRA run's WORKDIR (``config.model.lora_rank`` > 0) exports its adapters instead: DIR holds
``pytorch_lora_weights.safetensors`` (float32; ``--lora-format``: diffusers' peft layout, the
default, or the kohya layout of the authors' script), which stock diffusers loads onto the teacher
with ``pipe.load_lora_weights(DIR)``, and ``scheduler/``; with ``--merge`` also ``unet/`` (the
teacher with the adapters merged) and ``delta_weights.safetensors`` as above, and ``--base`` may
then add the rest of the pipeline.

``--model`` is a training run's WORKDIR (the newest checkpoint unless ``--step``; EMA weights
unless ``--weights student``) or a converted / diffusers folder whose scheduler is the PeRFlow
scheduler. Nothing partial is written: DIR appears only once everything succeeded (a hidden
folder left beside it by a killed export goes with the next one), and DIR may not be, hold or lie
inside --model, --base or the run's teacher. Files are written 0644 (under umask 022). No torch is
needed to export.

``--push-to-hub ORG/NAME`` then adds a model card (``README.md``: base model, recipe, sampling
settings, and the figures of ``--evaluation``'s metrics.json) and uploads DIR to that model
repository, created if absent (``perflow_jax.hub``; the token of ``hf auth login`` or HF_TOKEN).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from etils import epath

from perflow_jax import checkpoint, console, hub, lora, paths, pipeline
from perflow_jax.single_file import EXPORT_FILE, write_export
from perflow_jax.weights import (
    DTYPES,
    WeightsFileError,
    check_out,
    params_to_state_dict,
    read_json,
    read_model_index,
    replace_folder,
    require_empty,
    save_safetensors,
    staging_folder,
    write_diffusers_unet,
)

# Where diffusers finds the scheduler class named in model_index.json (the module that defines it).
SCHEDULER_LIBRARY = "perflow_jax.torch.scheduler"
DELTA_FILE = "delta_weights.safetensors"


class ExportError(ValueError):
    """The model, the base or the output folder do not allow the export."""


def export_to_torch(
    model: str | Path,
    out: str | Path,
    *,
    step: int | None = None,
    weights: str = "ema",
    dtype: str = "float16",
    base: str | Path | None = None,
    merge: bool = False,
    lora_format: str | None = None,
    single_file: bool = False,
    overwrite: bool = False,
    log: Callable[[str], Any] = print,
) -> Path:
    """Write the diffusers export of ``model`` to ``out`` (see the module docstring); returns ``out``."""
    model, out = epath.Path(model), paths.local(out, ExportError, "--out")
    base = paths.local(base, ExportError, "--base") if base else None
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r} is not supported: use one of {', '.join(DTYPES)}")
    if lora_format is not None and lora_format not in lora.FORMATS:
        raise ExportError(f"--lora-format {lora_format!r} is not supported: use one of {', '.join(lora.FORMATS)}")
    if not checkpoint.is_workdir(model) and (step is not None or weights != "ema"):
        raise ExportError(
            f"--step and --weights choose a training checkpoint, but {model} is a model folder, not a training "
            "run's WORKDIR (one with checkpoints/)"
        )
    teacher_dir = pipeline.describe(model, step=step).folder  # a WORKDIR's config.model.path, else model
    inputs = {"--model": model, "--base": base, "the teacher folder (config.model.path)": teacher_dir}
    check_out(out, inputs, ExportError)
    if not overwrite:
        require_empty(out, ExportError, "choose another --out or pass --overwrite")
    components = read_model_index(base) if base else None
    start = time.perf_counter()
    trained = pipeline.load_trained(model, step=step, weights=weights, networks=())
    described = trained.description
    if described.perflow is None:
        raise ExportError(
            f"{model} is a Stable Diffusion folder, not a PeRFlow student (its scheduler is "
            f"{trained.model.scheduler_config.get('_class_name')}): give a training WORKDIR, or a folder "
            "exported by this command or released by the PeRFlow authors"
        )
    adapters = trained.adapters is not None
    if not adapters and (merge or lora_format):
        raise ExportError(
            f"--merge and --lora-format export a LoRA run's adapters, but {model} holds a whole UNet: leave them out"
        )
    if adapters and base and not merge:
        raise ExportError(
            f"{model} is a LoRA run: its export is the adapter file, which pipe.load_lora_weights(DIR) adds to the "
            "teacher's pipeline; pass --merge as well for a whole pipeline folder with the merged UNet"
        )
    student, unet_config = trained.model.params["unet"], _diffusers_config(trained.model.configs["unet"])
    if base:
        _check_same_architecture(unet_config, base)
    teacher_dir = teacher_dir if described.workdir else base
    teacher = pipeline.load_model(teacher_dir, networks=("unet",)) if teacher_dir else None
    if teacher is not None and _diffusers_config(teacher.configs["unet"]) != unet_config:
        raise ExportError(f"the teacher in {teacher_dir} is not the student's architecture: no delta can be taken")
    what = f"checkpoint {described.step} ({weights} weights)" if described.workdir else "the student"
    log(f"read {what} of {model} in {time.perf_counter() - start:.1f} s")

    staging = staging_folder(out, log)
    try:
        if adapters:
            fmt = lora_format or lora.FORMATS[0]
            lora.save(trained.adapters, trained.lora_spec, staging / lora.LORA_FILE, fmt)
            log(f"{lora.LORA_FILE} ({fmt} layout, rank {trained.lora_spec.rank}, float32)")
        if merge or not adapters:
            _write_unet_and_delta(staging, student, unet_config, dtype, teacher, teacher_dir, model, log)
        if single_file:
            written = write_export(staging / EXPORT_FILE, student, unet_config, base, dtype)
            log(f"{EXPORT_FILE} (original layout, {dtype}: {', '.join(written)})")
        noise_schedule = (teacher or trained.model).scheduler_config
        _write_scheduler(staging / "scheduler", noise_schedule, *described.perflow)
        log(f"scheduler/ (PeRFlowScheduler: {described.perflow[0]}, {described.perflow[1]} windows)")
        if base:
            _write_pipeline(staging, base, components)
            log(f"pipeline parts from {base}: {', '.join(n for n in components if n not in ('unet', 'scheduler'))}")
        replace_folder(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log(f"exported to {out} in {time.perf_counter() - start:.1f} s")
    return out


def _write_unet_and_delta(staging, student, unet_config, dtype, teacher, teacher_dir, model, log) -> None:
    """unet/ in ``dtype``, and the delta weights student - teacher when there is a teacher."""
    write_diffusers_unet(student, unet_config, staging / "unet", dtype=dtype)
    log(f"unet/ ({dtype})")
    if teacher is not None:
        _write_delta(student, teacher.params["unet"], staging / DELTA_FILE)
        log(f"{DELTA_FILE} (student - teacher of {teacher_dir}, float32)")
    else:
        log(f"no {DELTA_FILE}: {model} names no teacher; pass --base TEACHER_DIR to write one")


def _diffusers_config(config: dict[str, Any]) -> dict[str, Any]:
    """A UNet config without diffusers' bookkeeping keys (``_class_name``, ``_diffusers_version``, ...)."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _check_same_architecture(unet_config: dict[str, Any], base: Path) -> None:
    base_config = _diffusers_config(read_json(base / "unet" / "config.json"))
    different = sorted(k for k in unet_config.keys() | base_config.keys() if unet_config.get(k) != base_config.get(k))
    if different:
        raise ExportError(
            f"--base {base} has another UNet architecture than the student (different: {', '.join(different)}): "
            "give the diffusers folder of the model the student was distilled from"
        )


def _write_delta(student: Any, teacher: Any, path: Path) -> None:
    """student - teacher, float32, for every UNet key (diffusers' names), as one flat safetensors file."""
    student_state, teacher_state = params_to_state_dict(student), params_to_state_dict(teacher)
    delta = {
        key: np.asarray(value, np.float32) - np.asarray(teacher_state[key], np.float32)
        for key, value in student_state.items()
    }
    save_safetensors(delta, path)


def _write_scheduler(folder: Path, noise_schedule: dict[str, Any], parameterization: str, num_windows: int) -> None:
    folder.mkdir(parents=True)
    config = pipeline.perflow_scheduler_config(noise_schedule, parameterization, num_windows)
    (folder / "scheduler_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _write_pipeline(staging: Path, base: Path, components: dict[str, str]) -> None:
    """Copy the base's other parts and write a model_index.json that names the PeRFlow scheduler."""
    index = read_json(base / "model_index.json")
    for name in components:
        if name not in ("unet", "scheduler"):
            shutil.copytree(base / name, staging / name)
    index["unet"] = ["diffusers", "UNet2DConditionModel"]
    index["scheduler"] = [SCHEDULER_LIBRARY, pipeline.PERFLOW_SCHEDULER]
    (staging / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m perflow_jax.export",
        description="Export a trained PeRFlow student for PyTorch: a diffusers UNet folder, delta weights and "
        "the PeRFlow scheduler (and with --base a whole pipeline folder).",
    )
    parser.add_argument("--to-torch", action="store_true", required=True, help="export for PyTorch / diffusers")
    parser.add_argument("--model", required=True, help="training WORKDIR, or a converted PeRFlow folder (or gs:// URL)")
    parser.add_argument("--out", type=Path, required=True, help="folder to write (must be empty or absent)")
    parser.add_argument("--step", type=int, help="checkpoint step of a WORKDIR (default: the newest)")
    parser.add_argument("--weights", default="ema", choices=tuple(checkpoint.WEIGHTS), help="EMA (default) or student")
    parser.add_argument(
        "--dtype", default="float16", choices=tuple(DTYPES), help="unet/ dtype (default float16; the delta: float32)"
    )
    parser.add_argument("--base", type=Path, help="the teacher's diffusers folder: for a whole pipeline, or a delta")
    parser.add_argument("--merge", action="store_true", help="a LoRA run: also the merged unet/ and its delta")
    parser.add_argument("--lora-format", choices=lora.FORMATS, help="a LoRA run's file layout (default diffusers)")
    parser.add_argument(
        "--single-file", action="store_true", help="also write the student as one original-layout .safetensors"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--push-to-hub", metavar="ORG/NAME", help="then upload --out with a model card to this repo")
    parser.add_argument("--evaluation", type=Path, help="an evaluate --out folder: its figures in the card")
    parser.add_argument("--verbose", action="store_true", help=console.VERBOSE_HELP)
    args = vars(parser.parse_args(argv))
    console.set_log_levels(args.pop("verbose"))
    del args["to_torch"]  # required, so always set; the other flags' names are export_to_torch's parameters
    repo_id, evaluation = args.pop("push_to_hub"), args.pop("evaluation")
    try:
        if evaluation and not repo_id:
            raise ExportError("--evaluation only goes into the model card of --push-to-hub: give that too")
        metrics = hub.read_evaluation(evaluation, ExportError) if evaluation else None
        out = export_to_torch(**args)
        if repo_id:
            card = hub.model_card(out, args["model"], step=args["step"], base=args["base"], metrics=metrics)
            hub.push_folder(out, repo_id, card, ExportError)
    except (ExportError, checkpoint.CheckpointError, WeightsFileError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
