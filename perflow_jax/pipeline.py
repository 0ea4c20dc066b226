"""A loaded Stable Diffusion model: its networks' configs and parameters, tokenizers and scheduler config.

``load_model`` reads a converted folder (``python -m perflow_jax.convert``; no torch needed) or a
diffusers folder (converted in memory on the way).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from perflow_jax import models, schedule, weights

TOKENIZER_FIELDS = {"tokenizer": "input_ids", "tokenizer_2": "input_ids_2"}


@dataclasses.dataclass
class Model:
    """One model's parts. ``params[name]`` are numpy trees in their stored dtype."""

    path: Path
    classes: dict[str, str]  # network name -> PyTorch class name, e.g. "unet" -> "UNet2DConditionModel"
    configs: dict[str, dict[str, Any]]
    params: dict[str, Any]
    tokenizers: dict[str, Any]  # batch field ("input_ids", "input_ids_2") -> transformers CLIPTokenizer
    scheduler_config: dict[str, Any]

    @property
    def sdxl(self) -> bool:
        return "text_encoder_2" in self.classes

    def module(self, name: str, **module_kwargs):
        """The Flax module of network ``name`` (dtype, attention_backend, remat as keyword arguments)."""
        return models.from_config(self.classes[name], self.configs[name], **module_kwargs)

    def alphas_cumprod(self) -> np.ndarray:
        return schedule.alphas_cumprod_from_config(self.scheduler_config)

    def prediction_type(self) -> str:
        return self.scheduler_config.get("prediction_type", "epsilon")

    def tokenize(self, prompts: list[str]) -> dict[str, np.ndarray]:
        """Token ids of each tokenizer, [len(prompts), 77] int32, padded and truncated as in training."""
        return {
            field: np.asarray(
                tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True)[
                    "input_ids"
                ],
                np.int32,
            )
            for field, tokenizer in self.tokenizers.items()
        }


def load_model(path: str | Path, networks: tuple[str, ...] | None = None) -> Model:
    """A converted folder or a diffusers pipeline folder, as a Model.

    ``networks``: the networks to load (e.g. ``("vae",)``), default all the folder has.
    """
    from transformers import CLIPTokenizer

    path = Path(path)
    if (path / weights.CONVERTED_MANIFEST).is_file():
        manifest = json.loads((path / weights.CONVERTED_MANIFEST).read_text())
        names = [n for n in weights.PIPELINE_NETWORKS if n in manifest["components"] and n in (networks or n)]
        classes, configs, params = {}, {}, {}
        for name in names:
            classes[name], configs[name], params[name] = weights.read_component(path, name)
    elif (path / "model_index.json").is_file():
        components = weights.read_model_index(path)
        classes = {n: components[n] for n in weights.PIPELINE_NETWORKS if n in components and n in (networks or n)}
        configs = {n: json.loads((path / n / "config.json").read_text()) for n in classes}
        params = {
            n: weights.state_dict_to_params(
                weights.read_state_dict(path / n), models.from_config(classes[n], configs[n]).abstract_params(), name=n
            )
            for n in classes
        }
    else:
        raise weights.WeightsFileError(
            f"{path} is neither a converted model folder ({weights.CONVERTED_MANIFEST}) nor a diffusers folder "
            "(model_index.json): give the --out folder of python -m perflow_jax.convert, or a diffusers download"
        )
    tokenizers = {
        field: CLIPTokenizer.from_pretrained(str(path / folder))
        for folder, field in TOKENIZER_FIELDS.items()
        if (path / folder).is_dir()
    }
    scheduler_config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    return Model(path, classes, configs, params, tokenizers, scheduler_config)


# ---------------------------------------------------------------------------------------------
# A PeRFlow student to sample or export: a training run's checkpoint, or a folder whose
# scheduler is the PeRFlow scheduler (an export of this project, or the authors' release).

PERFLOW_SCHEDULER = "PeRFlowScheduler"
DEFAULT_LATENT_SIZE = 64  # diffusers' UNet2DConditionModel default sample_size (512 px with SD's VAE)


@dataclasses.dataclass
class Trained:
    """A student UNet with the pipeline parts it runs with.

    model: the pipeline; ``model.params["unet"]`` are the student's parameters.
    parameterization, num_windows: how the student's output is read ("velocity", "ddim_eps",
      "diff_eps") and its K; None for a plain Stable Diffusion folder (a teacher, DDIM only).
    step: the checkpoint's training step (None for a folder).
    teacher: the folder of the run's teacher (``config.model.path``; None for a folder).
    resolution: the image size in pixels the student was trained at (a folder: the UNet's
      ``sample_size``, default 64, times the VAE's downsampling).
    """

    model: Model
    parameterization: str | None
    num_windows: int | None
    step: int | None
    teacher: Path | None
    resolution: int


# The teacher's noise schedule, copied into the PeRFlow scheduler's config; diffusers' defaults
# stand in for keys a teacher's config leaves out.
NOISE_SCHEDULE_DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
}


def perflow_scheduler_config(noise_schedule: dict[str, Any], parameterization: str, num_windows: int) -> dict[str, Any]:
    """The PeRFlowScheduler config (``perflow_jax.torch``) of a student of a teacher with ``noise_schedule``.

    ``noise_schedule``: the teacher's scheduler config (its betas are kept); ``parameterization``:
    "velocity", "ddim_eps" or "diff_eps"; ``num_windows``: K.
    """
    schedule.check_parameterization(parameterization)
    return {
        "_class_name": PERFLOW_SCHEDULER,
        **{key: noise_schedule.get(key, default) for key, default in NOISE_SCHEDULE_DEFAULTS.items()},
        "set_alpha_to_one": False,
        "prediction_type": parameterization,
        "t_noise": 1,
        "t_clean": 0,
        "num_time_windows": num_windows,
    }


def perflow_scheduler_settings(scheduler_config: dict[str, Any]) -> tuple[str, int] | None:
    """(parameterization, K) of a PeRFlowScheduler config; None for any other scheduler."""
    if scheduler_config.get("_class_name") != PERFLOW_SCHEDULER:
        return None
    return scheduler_config["prediction_type"], int(scheduler_config["num_time_windows"])


def load_trained(
    path: str | Path, *, step: int | None = None, which: str = "ema", networks: tuple[str, ...] | None = None
) -> Trained:
    """A training run's folder (WORKDIR), a converted folder or a diffusers folder, as a Trained.

    For a WORKDIR the student is checkpoint ``step`` (default the newest), ``which`` weights: "ema"
    or "student"; the other networks come from the run's teacher folder. ``networks``: the networks
    besides the UNet to load (default all).
    """
    from perflow_jax import checkpoint

    path = Path(path)
    others = None if networks is None else tuple(n for n in networks if n != "unet")
    if checkpoint.is_workdir(path):
        step, student, config = checkpoint.trained_unet(path, step=step, weights=which)
        teacher = Path(config["model"]["path"])
        everything = tuple(n for n in weights.PIPELINE_NETWORKS if n != "unet")
        model = load_model(teacher, networks=others if others is not None else everything)
        unet_config = json.loads((teacher / "unet" / "config.json").read_text())
        model.classes["unet"], model.configs["unet"] = unet_config["_class_name"], unet_config
        model.params["unet"] = student
        perflow = config["perflow"]
        return Trained(model, perflow["parameterization"], int(perflow["num_windows"]), step, teacher,
                       int(config["data"]["resolution"]))  # fmt: skip
    if step is not None:
        raise weights.WeightsFileError(
            f"--step {step} names a training checkpoint, but {path} is a model folder, not a training run's WORKDIR"
        )
    model = load_model(path, networks=None if others is None else ("unet", *others))
    parameterization, num_windows = perflow_scheduler_settings(model.scheduler_config) or (None, None)
    vae_config = model.configs.get("vae") or json.loads((path / "vae" / "config.json").read_text())
    latent_size = model.configs["unet"].get("sample_size") or DEFAULT_LATENT_SIZE
    resolution = int(latent_size) * 2 ** (len(vae_config["block_out_channels"]) - 1)
    return Trained(model, parameterization, num_windows, None, None, resolution)
