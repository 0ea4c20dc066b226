"""A run's recipe (configs/*.py): checks before anything is compiled, and what the step builds from it.

``validate(config)`` checks the config on its own (names, ranges, required paths);
``validate_against(config, ...)`` checks it against the loaded model, the prepared data and the
devices. Both raise one ``ConfigError`` listing every problem found, each saying what is wrong
and what would be right. ``check_resumable`` compares the config with the one a WORKDIR was
trained with. ``settings`` and ``optimizer`` turn the config into the step's ``PeRFlowSettings``
and its optax optimizer. ``config_module`` loads a configs/*.py file, as a variant's file loads
the base recipe it overrides.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import os
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections
import optax

from perflow_jax import evaluate, fid, fid_inception, lora, loss, pipeline, schedule, sharding, solver, step, weights
from perflow_jax.models.attention import BACKENDS
from perflow_jax.models.unet import REMAT_POLICIES
from perflow_jax.paths import is_url

PATH_KEYS = ("model.path", "model.student_init", "data.path")
LR_SCHEDULES = ("constant", "cosine")
# Keys a resumed run may change: how long it runs, what it reports and measures, and how the step is computed
# (attention backend, rematerialisation, gradient accumulation), which changes no result beyond
# rounding, so that a run can resume on a device with less memory; data.allow_other_vae, a
# start-up check; and where compiled programs are cached. data.worker_count is not here: grain
# cannot restore its iterator with another number of workers.
RESUMABLE_KEYS = (
    "train.num_steps",
    "log.",
    "eval.",
    "checkpoint.",
    "model.attention_backend",
    "model.remat",
    "train.gradient_accumulation_steps",
    "data.allow_other_vae",
    "compilation_cache_dir",
)
# Keys added after runs were first saved, with the value that stands for how such a run trained, so
# that its WORKDIR resumes when the new config keeps that behaviour (and is refused, naming the key,
# when it does not).
ADDED_KEYS = {
    "perflow.huber_c": 1e-3,
    "data.sdxl_time_ids": "original",
    "model.lora_rank": 0,
    "model.lora_alpha": 8.0,
    "model.lora_targets": list(lora.DEFAULT_TARGETS),
    "model.lora_dropout": 0.0,
}


class ConfigError(ValueError):
    """A config that cannot run; the message lists every problem found."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("invalid config:\n" + "\n".join(f"  - {p}" for p in self.problems))


class ResumeError(ValueError):
    """A WORKDIR holds a run whose settings differ from this config in more than ``RESUMABLE_KEYS``."""


def _choice(problems: list[str], key: str, value: Any, valid: Sequence[str]) -> None:
    if value not in valid:
        problems.append(f"config.{key} is {value!r}: choose one of {', '.join(valid)}")


def _raise(problems: list[str]) -> None:
    if problems:
        raise ConfigError(problems)


def config_module(path: str | os.PathLike) -> types.ModuleType:
    """The module of the config file at ``path`` (call its ``get_config()``).

    configs/ is no package: config_flags loads its files by path, from any working directory, so a
    variant (configs/sd21.py) loads the base recipe it overrides (configs/sd15.py) by path too.
    """
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def validate(config: ml_collections.ConfigDict) -> None:
    """Static checks of ``config`` (no model, data or devices needed). Raises ConfigError."""
    problems: list[str] = []
    model, perflow, optim, log = config.model, config.perflow, config.optim, config.log

    if not model.path:
        problems.append(
            "config.model.path is empty: set --config.model.path=DIR, a folder from python -m perflow_jax.convert "
            "or a diffusers pipeline folder"
        )
    if not config.data.path:
        problems.append(
            "config.data.path is empty: set --config.data.path=DIR, a folder from python -m perflow_jax.prepare_data"
        )
    elif is_url(config.data.path):
        problems.append(
            f"config.data.path {config.data.path} is a URL, but the ArrayRecord data is read from a local disk: mount "
            "the bucket (gcsfuse) and give the mounted folder, or copy the data to a local disk"
        )
    if model.compute_dtype == "float16":
        problems.append(
            "config.model.compute_dtype is 'float16': training in float16 needs loss scaling, which this trainer "
            "does not do; use bfloat16 (as fast on GPUs and TPUs, and float32's range)"
        )
    else:
        _choice(problems, "model.compute_dtype", model.compute_dtype, weights.COMPUTE_DTYPES)
    _choice(problems, "model.teacher_dtype", model.teacher_dtype, tuple(weights.DTYPES))
    _choice(problems, "model.attention_backend", model.attention_backend, BACKENDS)
    _choice(problems, "model.remat", model.remat, tuple(REMAT_POLICIES))
    problems.extend(_lora_problems(model))

    _choice(problems, "perflow.parameterization", perflow.parameterization, schedule.PARAMETERIZATIONS)
    _choice(problems, "perflow.teacher_prediction_type", perflow.teacher_prediction_type, solver.PREDICTION_TYPES)
    _choice(problems, "perflow.distance", perflow.distance, loss.DISTANCES)
    _choice(problems, "perflow.weighting", perflow.weighting, loss.WEIGHTINGS)
    if not perflow.huber_c > 0:
        problems.append(
            f"config.perflow.huber_c is {perflow.huber_c}: use a positive constant (the authors' default "
            f"{loss.HUBER_C}); at 0 the huber distance is |d|, without a gradient at d = 0"
        )
    k, s, m = perflow.num_windows, perflow.solver_steps, perflow.discrete_timesteps
    if k < 1:
        problems.append(f"config.perflow.num_windows is {k}: use at least 1 (the recipes use 4)")
    if s < 1:
        problems.append(f"config.perflow.solver_steps is {s}: the teacher needs at least 1 step per window (8 or 10)")
    if k >= 1 and s >= 1 and k * s > schedule.NUM_TRAIN_TIMESTEPS:
        problems.append(
            f"config.perflow.num_windows x solver_steps is {k * s}, more than the teacher's "
            f"{schedule.NUM_TRAIN_TIMESTEPS} timesteps: each solver step must move at least one timestep"
        )
    if not (math.isfinite(perflow.teacher_guidance) and perflow.teacher_guidance >= 1):
        problems.append(
            f"config.perflow.teacher_guidance is {perflow.teacher_guidance}: use 1 for cfg_sync (one teacher pass on "
            "the student's text, the SD1.5 recipe) or more for classifier-free guidance (7.5 in the SDXL recipe)"
        )
    if not k <= m <= schedule.NUM_TRAIN_TIMESTEPS:
        problems.append(
            f"config.perflow.discrete_timesteps is {m}: use between num_windows ({k}) and "
            f"{schedule.NUM_TRAIN_TIMESTEPS}, so that every window holds a training time (1000, or 200 for SDXL)"
        )
    if not 0 <= perflow.text_dropout < 1:
        problems.append(
            f"config.perflow.text_dropout is {perflow.text_dropout}: use a probability in [0, 1) (the recipes: 0.1)"
        )
    if not 0 <= perflow.ema_max_decay <= 1:
        problems.append(f"config.perflow.ema_max_decay is {perflow.ema_max_decay}: use a value in [0, 1] (0.9999)")

    _choice(problems, "data.sdxl_time_ids", config.data.sdxl_time_ids, pipeline.SDXL_TIME_IDS)
    if config.data.resolution < 1:
        problems.append(f"config.data.resolution is {config.data.resolution}: use the prepared data's size in pixels")
    if optim.lr <= 0:
        problems.append(f"config.optim.lr is {optim.lr}: use a positive learning rate (8e-5 in the SD1.5 recipe)")
    for key in ("b1", "b2"):
        if not 0 <= optim[key] < 1:
            problems.append(f"config.optim.{key} is {optim[key]}: use a value in [0, 1) (0.9 and 0.999)")
    if optim.eps <= 0:
        problems.append(f"config.optim.eps is {optim.eps}: use a small positive number (1e-8)")
    if optim.weight_decay < 0:
        problems.append(f"config.optim.weight_decay is {optim.weight_decay}: use 0 or more (1e-2)")
    if optim.grad_clip <= 0:
        problems.append(f"config.optim.grad_clip is {optim.grad_clip}: use a positive global norm (1.0)")
    _choice(problems, "optim.schedule", optim.schedule, LR_SCHEDULES)
    if optim.warmup_steps < 0:
        problems.append(f"config.optim.warmup_steps is {optim.warmup_steps}: use 0 (no warm-up) or more")
    elif optim.schedule == "cosine" and optim.warmup_steps >= config.train.num_steps:
        problems.append(
            f"config.optim.warmup_steps ({optim.warmup_steps}) leaves no steps of the cosine decay in "
            f"config.train.num_steps ({config.train.num_steps}): use fewer warm-up steps"
        )

    if config.train.global_batch_size < 1:
        problems.append(f"config.train.global_batch_size is {config.train.global_batch_size}: use at least 1")
    if config.train.num_steps < 1:
        problems.append(f"config.train.num_steps is {config.train.num_steps}: use at least 1")
    if config.train.gradient_accumulation_steps < 1:
        problems.append(
            f"config.train.gradient_accumulation_steps is {config.train.gradient_accumulation_steps}: use at least 1 "
            "(1: the whole batch at once)"
        )
    problems.extend(_mesh_problems(tuple(config.mesh.shape)))
    for key in ("checkpoint.every_steps", "checkpoint.keep", "log.every_steps", "log.eval_every_steps"):
        group, name = key.split(".")
        if config[group][name] < 1:
            problems.append(f"config.{key} is {config[group][name]}: use at least 1")

    if not log.sample_prompts:
        problems.append("config.log.sample_prompts is empty: give at least one prompt for the sample grid")
    if log.sample_steps < k:
        problems.append(
            f"config.log.sample_steps is {log.sample_steps} but there are {k} windows: every window needs a step, "
            f"so the sampler would silently run {k}; set --config.log.sample_steps={k} or more"
        )
    if not (math.isfinite(log.sample_guidance) and log.sample_guidance >= 0):
        problems.append(f"config.log.sample_guidance is {log.sample_guidance}: use 0 or more (1 turns CFG off)")
    problems.extend(_eval_problems(config))
    _raise(problems)


def _eval_problems(config: ml_collections.ConfigDict) -> list[str]:
    """config.eval: with train-time FID on, its numbers, and files that exist and fit the run (read here,
    before any training)."""
    e = config.eval
    if e.fid_every < 0:
        return [f"config.eval.fid_every is {e.fid_every}: use 0 (off) or N, an FID every N steps"]
    if e.fid_every == 0:
        return []
    problems: list[str] = []
    if e.num_images < 2:
        problems.append(f"config.eval.num_images is {e.num_images}: FID needs at least 2 images (e.g. 2000)")
    if e.batch_size < 1:
        problems.append(f"config.eval.batch_size is {e.batch_size}: use at least 1 (images per jitted call)")
    k = config.perflow.num_windows
    if e.steps and e.steps < k:
        problems.append(
            f"config.eval.steps is {e.steps} but there are {k} windows: use 0 (log.sample_steps) or {k} or more"
        )
    if e.prompts and not Path(e.prompts).is_file():
        problems.append(f"config.eval.prompts {e.prompts} is not a file: give a prompts file, or '' for the grid's")
    _choice(problems, "eval.features", e.features, tuple(evaluate.FEATURES))
    if e.features == "inception" and not (e.inception and Path(e.inception).is_file()):
        problems.append(
            f"config.eval.inception {e.inception!r} is not a file: download {fid_inception.WEIGHTS_URL} and set "
            "--config.eval.inception=PATH"
        )
    make = f"make it with python -m perflow_jax.evaluate --features {e.features} --height {config.data.resolution}"
    if not e.reference or not Path(e.reference).is_file():
        problems.append(
            f"config.eval.reference {e.reference!r} is not a file: {make} --reference IMAGES ... --out DIR (it "
            "writes DIR/references/NAME.npz) and set --config.eval.reference=DIR/references/NAME.npz"
        )
    elif e.features in evaluate.FEATURES:
        try:
            fid.load_reference(e.reference, eval_spec(config))
        except fid.FIDError as error:
            problems.append(f"config.eval.reference: {error}; {make}")
    return problems


def eval_spec(config: ml_collections.ConfigDict) -> fid.FeatureSpec:
    """How train-time FID features are made: config.eval.features on data.resolution images, as evaluate's."""
    return fid.FeatureSpec(evaluate.FEATURES[config.eval.features], config.data.resolution, evaluate.RESIZE)


def _lora_problems(model: ml_collections.ConfigDict) -> list[str]:
    """The LoRA keys: a rank of 0 (a full fine-tune) or more, a positive alpha, targets, no dropout."""
    problems = []
    if model.lora_rank < 0:
        problems.append(f"config.model.lora_rank is {model.lora_rank}: use 0 (train the whole UNet) or a rank, e.g. 64")
    if not model.lora_alpha > 0:
        problems.append(f"config.model.lora_alpha is {model.lora_alpha}: use a positive scale numerator (peft's 8)")
    if not model.lora_targets or not all(isinstance(t, str) and t for t in model.lora_targets):
        problems.append(
            f"config.model.lora_targets is {model.lora_targets!r}: name UNet modules, e.g. the authors' "
            f"{', '.join(lora.DEFAULT_TARGETS[:4])}, ..."
        )
    if model.lora_dropout != 0:
        problems.append(
            f"config.model.lora_dropout is {model.lora_dropout}: only 0 is supported (the authors' LoRA script uses "
            "peft's default, no dropout); set --config.model.lora_dropout=0"
        )
    if model.lora_rank > 0 and model.student_init:
        problems.append(
            f"config.model.student_init is {model.student_init!r} with config.model.lora_rank {model.lora_rank}: a "
            "LoRA student adapts the teacher itself (one UNet in memory); leave student_init empty, or set lora_rank=0"
        )
    return problems


def with_absolute_paths(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of ``config`` whose folders (``PATH_KEYS``) are absolute.

    The run's config is saved with its checkpoints; ``export`` and ``sample`` find the teacher
    through it, from whatever directory they are started in.
    """
    config = config.copy_and_resolve_references()
    for key in PATH_KEYS:
        group, name = key.split(".")
        if config[group][name]:
            config[group][name] = absolute_path(config[group][name])
    return config


def absolute_path(path: str) -> str:
    """``path`` (``~`` expanded) as an absolute, normalised path from the current directory; a URL as it is."""
    return path if is_url(path) else os.path.abspath(os.path.expanduser(path))


def check_resumable(saved: dict[str, Any], config: dict[str, Any]) -> None:
    """Refuse to resume a WORKDIR whose run differs in more than length and logging; list the keys.

    A relative folder in ``saved`` (a WORKDIR written before folders were saved absolute) is read
    from the current directory, as that run read it; a key missing from ``saved`` has its ``ADDED_KEYS`` value.
    """
    new_flat = {k: list(v) if isinstance(v, tuple) else v for k, v in weights.flatten(config).items()}
    saved_flat = {**{k: v for k, v in ADDED_KEYS.items() if k in new_flat}, **weights.flatten(saved)}
    for key in PATH_KEYS:
        if saved_flat.get(key):
            saved_flat[key] = absolute_path(saved_flat[key])
    differing = sorted(
        key
        for key in set(saved_flat) | set(new_flat)
        if saved_flat.get(key) != new_flat.get(key) and not key.startswith(RESUMABLE_KEYS)
    )
    if differing:
        details = "; ".join(f"{k}: {saved_flat.get(k)!r} saved, {new_flat.get(k)!r} now" for k in differing)
        raise ResumeError(
            f"this WORKDIR holds a run with other settings ({details}): use another --workdir, or the saved settings"
        )


def unknown_override(argv: Sequence[str]) -> str | None:
    """The error for the first ``--config.KEY`` of ``argv`` whose key its ``--config`` file lacks, naming the
    closest valid keys; None when every key exists or the config file does not load (its own error stands).

    config_flags raises a bare AttributeError or KeyError for such a key while absl parses the flags.
    """
    path = next((arg.partition("=")[2] for arg in argv if arg.startswith("--config=")), None)
    if path is None and "--config" in argv[:-1]:
        path = argv[list(argv).index("--config") + 1]
    try:
        config = config_module(path).get_config().to_dict()
    except Exception:  # any failure: config_flags' own error is the one to see
        return None
    leaves = weights.flatten(config)
    groups = {prefix for key in leaves for prefix in _prefixes(key)}
    for key in (arg[len("--config.") :].partition("=")[0] for arg in argv if arg.startswith("--config.")):
        if key in leaves or key in groups:
            continue
        close = difflib.get_close_matches(key, sorted(leaves.keys() | groups), n=3, cutoff=0.8)
        if close:
            hint = f"did you mean {' or '.join(f'config.{k}' for k in close)}?"
        else:
            parent = max((g for g in _prefixes(key) if g in groups), key=len, default="")
            below = sorted({k[len(parent) :].lstrip(".").partition(".")[0] for k in leaves if k.startswith(parent)})
            hint = f"config{'.' if parent else ''}{parent} holds {', '.join(below)}"
        return f"--config.{key}: {path} has no key {key}; {hint}"
    return None


def _prefixes(key: str) -> list[str]:
    """'a.b.c' -> ['a', 'a.b']."""
    parts = key.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _mesh_problems(shape: tuple[int, ...], device_count: int | None = None) -> list[str]:
    try:
        sharding.resolve_mesh_shape(shape, device_count)
    except ValueError as error:
        return [f"config.{str(error).replace('mesh shape', 'mesh.shape', 1)}"]
    return []


def validate_against(
    config: ml_collections.ConfigDict,
    *,
    cross_attention_dim: int,
    text_widths: Sequence[int],
    sdxl: bool,
    manifest: dict[str, Any],
    device_count: int,
    teacher_prediction_type: str | None = None,
) -> None:
    """Check ``config`` against the model, the prepared data and the devices. Raises ConfigError.

    Args:
      cross_attention_dim: the UNet config's cross-attention width.
      text_widths: the hidden width of each text encoder, in order (SDXL: both, concatenated).
      sdxl: whether the UNet is SDXL's (two text encoders, pooled text and size ids).
      manifest: the prepared data's manifest (``data.read_manifest``).
      device_count: the number of devices of the run, over all hosts.
      teacher_prediction_type: the teacher scheduler's prediction_type, where known.
    """
    problems: list[str] = []
    widths = list(text_widths)
    if sum(widths) != cross_attention_dim:
        given = " + ".join(str(w) for w in widths)
        problems.append(
            f"UNet config has cross_attention_dim {cross_attention_dim} but the text encoder"
            f"{'s give' if len(widths) > 1 else ' gives'} {given}-wide states: "
            + _model_hint(cross_attention_dim, sdxl)
        )
    has_second_tokens = "input_ids_2" in manifest.get("tokenizers", ())
    if sdxl and not has_second_tokens:
        problems.append(
            f"the UNet is SDXL's (two text encoders) but the data at {config.data.path} holds token ids of one "
            "tokenizer (no input_ids_2): prepare it again with python -m perflow_jax.prepare_data --model pointing "
            "at the SDXL model"
        )
    if not sdxl and has_second_tokens:
        problems.append(
            f"the data at {config.data.path} was prepared for SDXL (it has input_ids_2) but the UNet is not SDXL's: "
            "prepare the data again with this model, or set --config.model.path to the SDXL model and use "
            "configs/sdxl.py"
        )
    if "resolution" in manifest and manifest["resolution"] != config.data.resolution:
        problems.append(
            f"config.data.resolution is {config.data.resolution} but the data at {config.data.path} was prepared at "
            f"{manifest['resolution']} px: set --config.data.resolution={manifest['resolution']}, or prepare the "
            f"data again with --resolution {config.data.resolution}"
        )
    if teacher_prediction_type is not None and teacher_prediction_type != config.perflow.teacher_prediction_type:
        problems.append(
            f"the teacher's scheduler predicts {teacher_prediction_type!r} but config.perflow.teacher_prediction_type "
            f"is {config.perflow.teacher_prediction_type!r}: set --config.perflow.teacher_prediction_type="
            f"{teacher_prediction_type}"
            + (" (an SD2.x 768 model: configs/sd21.py)" if teacher_prediction_type == "v_prediction" else "")
        )
    batch = config.train.global_batch_size
    if batch % device_count:
        lower, upper = batch // device_count * device_count, (batch // device_count + 1) * device_count
        nearest = f"{lower} or {upper}" if lower else f"{upper}"
        problems.append(
            f"config.train.global_batch_size {batch} does not split evenly over {device_count} devices: "
            f"use a multiple of {device_count}, e.g. {nearest}"
        )
    else:
        problems.extend(_accumulation_problems(batch // device_count, config.train.gradient_accumulation_steps))
    problems.extend(_mesh_problems(tuple(config.mesh.shape), device_count))
    _raise(problems)


def _accumulation_problems(per_device: int, steps: int) -> list[str]:
    """The microbatches must split each device's examples evenly, so that each stays on its device."""
    if steps < 1 or per_device % steps == 0:
        return []
    divisors = [d for d in range(1, per_device + 1) if per_device % d == 0]
    nearest = min(divisors, key=lambda d: (abs(d - steps), -d))
    return [
        f"config.train.gradient_accumulation_steps {steps} does not split the {per_device} examples per device "
        f"(config.train.global_batch_size over the devices) into equal microbatches: use a divisor of {per_device}, "
        f"e.g. {nearest}, or a global batch that is a multiple of the devices x {steps}"
    ]


def _model_hint(cross_attention_dim: int, sdxl: bool) -> str:
    if sdxl or cross_attention_dim == 2048:
        return (
            "is this an SDXL checkpoint? Convert the whole SDXL pipeline (both text encoders) and use configs/sdxl.py"
        )
    if cross_attention_dim == 1024:
        return "is this an SD2.x checkpoint? Use its own text encoder (OpenCLIP, 1024 wide) and configs/sd21.py"
    if cross_attention_dim == 768:
        return "is this an SD1.x checkpoint? Use its own text encoder (CLIP ViT-L, 768 wide) and configs/sd15.py"
    return "the UNet and the text encoder come from different models: convert them from one diffusers pipeline folder"


def settings(config: ml_collections.ConfigDict) -> step.PeRFlowSettings:
    """The step's algorithm settings: ``config.perflow``, whose keys are PeRFlowSettings' fields."""
    types = {field.name: type(field.default) for field in dataclasses.fields(step.PeRFlowSettings)}
    return step.PeRFlowSettings(**{name: cast(config.perflow[name]) for name, cast in types.items()})


def learning_rate(config: ml_collections.ConfigDict) -> optax.Schedule:
    """The learning rate at each step: linear warm-up from 0 over ``warmup_steps``, then constant or cosine to 0."""
    optim = config.optim
    decay_steps = max(config.train.num_steps - optim.warmup_steps, 1)
    if optim.schedule == "constant":
        main = optax.constant_schedule(optim.lr)
    elif optim.schedule == "cosine":
        main = optax.cosine_decay_schedule(optim.lr, decay_steps)
    else:
        raise ConfigError([f"config.optim.schedule is {optim.schedule!r}: choose one of {', '.join(LR_SCHEDULES)}"])
    if optim.warmup_steps <= 0:
        return main
    warmup = optax.linear_schedule(0.0, optim.lr, optim.warmup_steps)
    return optax.join_schedules([warmup, main], [optim.warmup_steps])


def optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW on ``learning_rate(config)`` (step.make_optimizer)."""
    keys = ("b1", "b2", "eps", "weight_decay", "grad_clip")
    return step.make_optimizer(learning_rate(config), **{key: config.optim[key] for key in keys})
