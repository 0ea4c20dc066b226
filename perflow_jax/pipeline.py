"""A Stable Diffusion model on the devices: loading, text encoding, the UNet as a function, and generation.

``load_model`` reads a converted folder (``python -m perflow_jax.convert``; no torch needed) or a
diffusers folder; ``load_trained`` a training run's student; ``describe`` reads only their config
files. ``Generator`` is the one jitted prompts -> images function (text encoders, the PeRFlow
sampler or the teacher's DDIM with classifier-free guidance, VAE decode) that sampling, the
training run's grids and the benchmarks call; given ControlNets (``controlnet/NAME/`` of a
converted folder) and control images, the UNet it samples with is steered by them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from perflow_jax import checkpoint, lora, models, paths, sampler, schedule, sharding, solver
from perflow_jax import weights as weights_io
from perflow_jax.weights import read_json  # every JSON file of a model is read through it

TOKENIZER_FIELDS = {"tokenizer": "input_ids", "tokenizer_2": "input_ids_2"}


@dataclasses.dataclass
class Model:
    """One model's parts. ``params[name]`` are numpy trees in their stored dtype."""

    path: epath.Path
    classes: dict[str, str]  # network name -> PyTorch class name, e.g. "unet" -> "UNet2DConditionModel"
    configs: dict[str, dict[str, Any]]
    params: dict[str, Any]
    tokenizers: dict[str, Any]  # batch field ("input_ids", "input_ids_2") -> transformers CLIPTokenizer
    scheduler_config: dict[str, Any]
    # ControlNet name -> (its config dict, its parameters): those asked of load_model.
    controlnets: dict[str, tuple[dict[str, Any], Any]] = dataclasses.field(default_factory=dict)

    @property
    def sdxl(self) -> bool:
        return "text_encoder_2" in self.classes

    @property
    def text_encoders(self) -> list[str]:
        """The names of its text encoders: ["text_encoder"], and "text_encoder_2" for SDXL."""
        return [n for n in ("text_encoder", "text_encoder_2") if n in self.classes]

    def module(self, name: str, **module_kwargs):
        """The Flax module of network ``name`` (dtype, attention_backend, remat as keyword arguments)."""
        return models.from_config(self.classes[name], self.configs[name], **module_kwargs)

    def alphas_cumprod(self) -> np.ndarray:
        return schedule.alphas_cumprod_from_config(self.scheduler_config)

    def final_alpha_cumprod(self) -> float:
        return schedule.final_alpha_from_config(self.scheduler_config)

    def prediction_type(self) -> str:
        return self.scheduler_config.get("prediction_type", "epsilon")

    def tokenize(self, prompts: list[str]) -> dict[str, np.ndarray]:
        """Token ids of each tokenizer, [len(prompts), 77] int32, padded and truncated as in training."""
        return {
            field: np.asarray(
                tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids, np.int32
            )
            for field, tok in self.tokenizers.items()
        }


def load_model(
    path: str | os.PathLike, networks: tuple[str, ...] | None = None, controlnets: Sequence[str] = ()
) -> Model:
    """A converted folder (local or a ``gs://`` URL) or a diffusers pipeline folder, as a Model.

    ``networks``: the networks to load (e.g. ``("vae",)``), default all the folder has. ``controlnets``:
    the names of the converted folder's ControlNets to load (``load_controlnets``).
    """
    from transformers import CLIPTokenizer

    path = epath.Path(path)
    if (path / weights_io.CONVERTED_MANIFEST).is_file():
        manifest = read_json(path / weights_io.CONVERTED_MANIFEST)
        names = [n for n in weights_io.PIPELINE_NETWORKS if n in manifest["components"] and n in (networks or n)]
        classes, configs, params = {}, {}, {}
        for name in names:
            classes[name], configs[name], params[name] = weights_io.read_component(path, name)
    elif (path / "model_index.json").is_file():
        if paths.is_url(path):
            raise weights_io.WeightsFileError(
                f"{path} is a diffusers folder on a bucket, which is read from a local disk only: convert it with "
                f"python -m perflow_jax.convert --from DIR --out {path} (a converted folder may be a gs:// URL)"
            )
        components = weights_io.read_model_index(path)
        classes = {n: components[n] for n in weights_io.PIPELINE_NETWORKS if n in components and n in (networks or n)}
        configs = {n: read_json(path / n / "config.json") for n in classes}
        params = {
            n: weights_io.state_dict_to_params(
                weights_io.read_state_dict(path / n),
                models.from_config(classes[n], configs[n]).abstract_params(),
                name=n,
            )
            for n in classes
        }
    else:
        raise weights_io.WeightsFileError(
            f"{path} is neither a converted model folder ({weights_io.CONVERTED_MANIFEST}) nor a diffusers folder "
            "(model_index.json): give the --out folder of python -m perflow_jax.convert, or a diffusers download"
        )
    tokenizers = {}
    for folder, field in TOKENIZER_FIELDS.items():
        if (path / folder).is_dir():
            with paths.local_copy(path / folder) as files:
                tokenizers[field] = CLIPTokenizer.from_pretrained(str(files))
    scheduler_config = read_json(path / "scheduler" / "scheduler_config.json")
    loaded = load_controlnets(path, controlnets) if controlnets else {}
    return Model(path, classes, configs, params, tokenizers, scheduler_config, loaded)


# ---------------------------------------------------------------------------------------------
# ControlNets: a converted folder's controlnet/NAME/ (python -m perflow_jax.convert --controlnet DIR:NAME).

CONTROLNET_FOLDER = "controlnet"
CONTROLNET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def controlnet_names(folder: str | os.PathLike) -> list[str]:
    """The names of the ControlNets converted into ``folder``, sorted."""
    root = epath.Path(folder) / CONTROLNET_FOLDER
    return sorted(p.name for p in root.iterdir() if (p / "config.json").is_file()) if root.is_dir() else []


def check_controlnet_fits(config: dict[str, Any], unet_config: dict[str, Any], vae_config: dict[str, Any]) -> None:
    """Raise ValueError naming every dimension in which a ControlNet (its config.json dict) does not fit the UNet
    it is to steer, and a control-image embedding that does not downsample as the VAE does."""
    controlnet = models.controlnet.ControlNetConfig.from_dict(config)
    problems = models.controlnet.architecture_mismatches(controlnet, models.unet.UNetConfig.from_dict(unet_config))
    if problems:
        raise ValueError(
            f"this ControlNet is for another base model: {'; '.join(problems)} (ControlNet vs the model's UNet): "
            "give a ControlNet trained on this model's architecture (e.g. an SD1.5 ControlNet for SD1.5)"
        )
    factor = 2 ** (len(controlnet.conditioning_embedding_out_channels) - 1)
    vae_factor = models.vae.VAEConfig.from_dict(vae_config).downsampling_factor
    if factor != vae_factor:
        raise ValueError(
            f"this ControlNet embeds control images at 1/{factor} of their size but the model's latents are 1/"
            f"{vae_factor} of the image size: give a ControlNet of this model's VAE resolution"
        )


def load_controlnets(folder: str | os.PathLike, names: Sequence[str]) -> dict[str, tuple[dict[str, Any], Any]]:
    """{name: (config dict, parameters)} of the ControlNets ``names`` of converted ``folder``, each checked to fit
    its UNet (``check_controlnet_fits``); WeightsFileError for an unknown name (listing the known) or a misfit."""
    folder = epath.Path(folder)
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise weights_io.WeightsFileError(
            f"ControlNet {', '.join(map(repr, twice))} given more than once: give each ControlNet once (to steer "
            "with two control images of one kind, convert it twice under two names, --controlnet DIR:NAME)"
        )
    available = controlnet_names(folder)
    unknown = [name for name in names if name not in available]
    if unknown:
        raise weights_io.WeightsFileError(
            f"{folder} has no ControlNet {', '.join(map(repr, unknown))}; it has {', '.join(available) or 'none'}: "
            "convert one into it with python -m perflow_jax.convert --controlnet DIR:NAME"
        )
    unet_config, vae_config = (read_json(folder / name / "config.json") for name in ("unet", "vae"))
    controlnets = {}
    for name in names:
        try:
            check_controlnet_fits(read_json(folder / CONTROLNET_FOLDER / name / "config.json"), unet_config, vae_config)
        except ValueError as error:
            raise weights_io.WeightsFileError(f"{folder / CONTROLNET_FOLDER / name}: {error}") from error
        _, config, params = weights_io.read_component(folder, f"{CONTROLNET_FOLDER}/{name}")
        controlnets[name] = (config, params)
    return controlnets


# ---------------------------------------------------------------------------------------------
# A PeRFlow student to sample or export: a training run's checkpoint, or a folder whose
# scheduler is the PeRFlow scheduler (an export of this project, or the authors' release).

PERFLOW_SCHEDULER = "PeRFlowScheduler"
DEFAULT_LATENT_SIZE = 64  # diffusers' UNet2DConditionModel default sample_size (512 px with SD's VAE)


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


@dataclasses.dataclass(frozen=True)
class Description:
    """What a model path holds, from its config files alone (no weights read).

    path: the path given. folder: the pipeline folder whose VAE, text encoders, tokenizers and
    scheduler go with the UNet (a WORKDIR's teacher, ``config.model.path``; else ``path``).
    step: a WORKDIR's checkpoint step (None for a folder). perflow: (parameterization, K) of a
    PeRFlow student; None for a plain Stable Diffusion folder (a teacher, DDIM only).
    resolution: the image size in pixels the student was trained at (a folder: the UNet's
    ``sample_size``, default 64, times the VAE's downsampling factor).
    """

    path: epath.Path
    folder: epath.Path
    step: int | None
    perflow: tuple[str, int] | None
    resolution: int

    @property
    def workdir(self) -> bool:
        return self.step is not None


def describe(path: str | os.PathLike, *, step: int | None = None) -> Description:
    """The Description of a training WORKDIR (checkpoint ``step``, default the newest readable) or a model folder."""
    path = epath.Path(path)
    if checkpoint.is_workdir(path):
        step, config = checkpoint.run_config(path, step=step)
        folder = epath.Path(config["model"]["path"])
        if not is_model_folder(folder):
            raise weights_io.WeightsFileError(
                f"{path} was trained from {folder} (config.model.path), which holds no model now: "
                "put the teacher folder back there"
            )
        perflow = (config["perflow"]["parameterization"], int(config["perflow"]["num_windows"]))
        return Description(path, folder, step, perflow, int(config["data"]["resolution"]))
    if step is not None:
        raise weights_io.WeightsFileError(
            f"--step {step} names a training checkpoint, but {path} is a model folder, not a training run's "
            "WORKDIR: leave --step out, or give the WORKDIR"
        )
    if not is_model_folder(path):
        raise weights_io.WeightsFileError(
            f"{path} is neither a training run's WORKDIR (checkpoints/) nor a model folder (vae/, unet/ and "
            "scheduler/ configs, converted or diffusers): give one of those"
        )
    perflow = perflow_scheduler_settings(read_json(path / "scheduler" / "scheduler_config.json"))
    vae = models.vae.VAEConfig.from_dict(read_json(path / "vae" / "config.json"))
    latent_size = read_json(path / "unet" / "config.json").get("sample_size") or DEFAULT_LATENT_SIZE
    return Description(path, path, None, perflow, int(latent_size) * vae.downsampling_factor)


def is_model_folder(folder: epath.Path) -> bool:
    """Whether ``folder`` has the VAE, UNet and scheduler configs of a converted or diffusers model."""
    return all(
        (folder / name).is_file() for name in ("vae/config.json", "unet/config.json", "scheduler/scheduler_config.json")
    )


@dataclasses.dataclass
class Trained:
    """A student UNet with the pipeline parts it runs with.

    model: the pipeline; ``model.params["unet"]`` are the student's parameters (a plain Stable
    Diffusion folder's UNet: the teacher). description: what ``describe`` says of the path.
    adapters, lora_spec: a LoRA run's adapters and their LoraSpec (``model.params["unet"]`` is the
    teacher with them merged); None otherwise.
    """

    model: Model
    description: Description
    adapters: Any = None
    lora_spec: lora.LoraSpec | None = None


def load_trained(
    path: str | os.PathLike, *, step: int | None = None, weights: str = "ema", networks: tuple[str, ...] | None = None
) -> Trained:
    """A training run's folder (WORKDIR), a converted folder or a diffusers folder, as a Trained.

    For a WORKDIR the student is checkpoint ``step`` (default the newest readable), ``weights``: "ema" or
    "student"; the other networks come from the run's teacher folder (and a LoRA run's base UNet, its
    adapters merged in). ``networks``: the networks besides the UNet to load (default all).
    """
    description = describe(path, step=step)
    others = None if networks is None else tuple(n for n in networks if n != "unet")
    if not description.workdir:
        return Trained(load_model(path, networks=None if others is None else ("unet", *others)), description)
    read_step, student, config = checkpoint.trained_unet(path, step=step, weights=weights)
    if read_step != description.step:  # the newest checkpoint's weights are unreadable: an older one's were read
        description = describe(path, step=read_step)
    everything = tuple(n for n in weights_io.PIPELINE_NETWORKS if n != "unet")
    lora_spec = lora.spec(config["model"])
    wanted = everything if others is None else others
    model = load_model(description.folder, networks=wanted + ("unet",) if lora_spec else wanted)
    unet_config = read_json(description.folder / "unet" / "config.json")
    model.classes["unet"], model.configs["unet"] = unet_config["_class_name"], unet_config
    adapters = None
    if lora_spec is not None:
        adapters, student = student, lora.merge(model.params["unet"], student, lora_spec.scale)
    model.params["unet"] = student
    return Trained(model, description, adapters, lora_spec)


# ---------------------------------------------------------------------------------------------
# The networks as functions, and generation


SDXL_TIME_IDS = ("fixed", "original")


@dataclasses.dataclass(frozen=True, eq=False)
class TextEncoders:
    """The frozen CLIP text encoder(s) and the UNet condition they make (static under jit).

    SD1.x / SD2.x: one encoder, its last hidden state. SDXL (``text_encoder_2`` set): both
    encoders' penultimate hidden states side by side, the second's projected pooled output, and
    the size ids (original size, crop top-left, target size = ``resolution``). ``sdxl_time_ids``:
    "original", each example's own original size and crop from the batch; "fixed", every example
    as an uncropped image at ``resolution`` (resolution, resolution, 0, 0, resolution, resolution),
    as the authors' SDXL training does (configs/sd15.py, data.sdxl_time_ids).
    """

    text_encoder: nn.Module
    text_encoder_2: nn.Module | None = None
    resolution: int = 512
    sdxl_time_ids: str = "original"

    def __post_init__(self):
        if self.sdxl_time_ids not in SDXL_TIME_IDS:
            raise ValueError(f"sdxl_time_ids is {self.sdxl_time_ids!r}: use one of {', '.join(SDXL_TIME_IDS)}")

    def encode(self, params: dict[str, Any], batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """{"encoder_hidden_states"} (+ "text_embeds", "time_ids" for SDXL) from ``batch``'s token ids.

        params: {"text_encoder": ..., and for SDXL "text_encoder_2": ...} (more entries are fine).
        batch: "input_ids" [B, 77] int32; for SDXL also "input_ids_2", and with ``sdxl_time_ids``
        "original" "original_size", "crop_top_left" [B, 2].
        """
        first = self.text_encoder.apply({"params": params["text_encoder"]}, batch["input_ids"])
        if self.text_encoder_2 is None:
            return {"encoder_hidden_states": first.last_hidden_state}
        second = self.text_encoder_2.apply({"params": params["text_encoder_2"]}, batch["input_ids_2"])
        count = batch["input_ids"].shape[0]
        sizes = batch if self.sdxl_time_ids == "original" else self.size_ids(count)
        target = jnp.full((count, 2), self.resolution, jnp.int32)
        time_ids = jnp.concatenate([sizes["original_size"], sizes["crop_top_left"], target], axis=-1)
        return {
            "encoder_hidden_states": jnp.concatenate([first.hidden_states[-2], second.hidden_states[-2]], axis=-1),
            "text_embeds": second.text_embeds,
            "time_ids": time_ids.astype(jnp.float32),
        }

    def size_ids(self, count: int) -> dict[str, jax.Array]:
        """SDXL's size ids of ``count`` uncropped images at the target resolution (nothing for SD1.x / 2.x)."""
        if self.text_encoder_2 is None:
            return {}
        return {
            "original_size": jnp.full((count, 2), self.resolution, jnp.int32),
            "crop_top_left": jnp.zeros((count, 2), jnp.int32),
        }


def unet_apply(module: nn.Module, params: Any) -> solver.Apply:
    """The UNet as the pure functions want it: ``apply(z, timesteps, cond)`` with cond from ``TextEncoders.encode``."""

    def apply(z, timesteps, cond):
        sdxl = (cond.get("text_embeds"), cond.get("time_ids"))
        return module.apply({"params": params}, z, timesteps, cond["encoder_hidden_states"], *sdxl)

    return apply


def controlled_unet_apply(
    unet: nn.Module,
    unet_params: Any,
    controlnets: Sequence[nn.Module],
    controlnet_params: Sequence[Any],
    scales: Sequence[float],
    guess_mode: bool = False,
) -> solver.Apply:
    """The UNet steered by ControlNets, as diffusers' ControlNet pipelines run it: ``apply(z, timesteps, cond)``.

    cond: ``TextEncoders.encode``'s, plus "control": one control image [B, H, W, C] in [0, 1] per ControlNet,
    and in guess mode "control_weight" [B]: 1 where the ControlNets steer, 0 in classifier-free guidance's
    unconditional rows (diffusers gives those no residuals in guess mode). Each ControlNet's residuals are
    scaled by its conditioning scale (``scales``) and summed (diffusers' MultiControlNetModel).
    """

    def apply(z, timesteps, cond):
        sdxl = (cond.get("text_embeds"), cond.get("time_ids"))
        down, mid = None, None
        for module, params, image, scale in zip(controlnets, controlnet_params, cond["control"], scales, strict=True):
            d, m = module.apply(
                {"params": params},
                z,
                timesteps,
                cond["encoder_hidden_states"],
                image,
                *sdxl,
                conditioning_scale=scale,
                guess_mode=guess_mode,
            )
            if "control_weight" in cond:
                weight = cond["control_weight"][:, None, None, None]
                d, m = [r * weight.astype(r.dtype) for r in d], m * weight.astype(m.dtype)
            down = d if down is None else [a + b for a, b in zip(down, d, strict=True)]
            mid = m if mid is None else mid + m
        return unet.apply(
            {"params": unet_params},
            z,
            timesteps,
            cond["encoder_hidden_states"],
            *sdxl,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
        )

    return apply


METHODS = ("perflow", "ddim")


@dataclasses.dataclass(frozen=True)
class GenerateSettings:
    """How images are drawn (static under jit).

    method: "perflow" (the student, ``sampler.sample``) or "ddim" (the teacher's DDIM,
      ``solver.ddim_sample``, as diffusers' DDIMScheduler with "trailing" spacing runs it).
    num_steps: N, UNet evaluations per image (each on twice the batch when guidance != 1).
    guidance: the CFG scale w against the negative (by default empty) prompt; 1 runs the UNet on the prompts only.
    parameterization: the student's output, "velocity", "ddim_eps" or "diff_eps" (method "perflow").
    num_windows: K, the student's time windows (method "perflow"); N >= K.
    prediction_type: the teacher's output, "epsilon" or "v_prediction" (method "ddim").
    strength: img2img (method "perflow"): generate takes init images and runs the last
      min(int(N strength), N) steps from them (``sampler.img2img_first_step``); None draws from noise alone.
    control_scales: one conditioning scale per ControlNet of the Pipeline (none without ControlNets).
    guess_mode: diffusers' guess mode: the ControlNets' residuals weighted logspace(-1, 0) from conv_in's to the
      mid block's, and none in classifier-free guidance's unconditional branch.
    """

    method: str = "perflow"
    num_steps: int = 4
    guidance: float = 4.5
    parameterization: str = "diff_eps"
    num_windows: int = 4
    prediction_type: str = "epsilon"
    strength: float | None = None
    control_scales: tuple[float, ...] = ()
    guess_mode: bool = False

    def __post_init__(self):
        if not math.isfinite(self.guidance):
            raise ValueError(f"guidance {self.guidance}: give a finite scale, 1 (no guidance) or more")
        if not all(math.isfinite(scale) for scale in self.control_scales):
            raise ValueError(f"control scales {list(self.control_scales)}: give finite numbers (1 by default)")
        if self.guess_mode and not self.control_scales:
            raise ValueError("guess mode is a ControlNet mode: give ControlNets (and their control scales) or drop it")
        if self.method not in METHODS:
            raise ValueError(f"unknown sampling method {self.method!r}: use one of {', '.join(METHODS)}")
        if self.method == "perflow":
            schedule.check_parameterization(self.parameterization)
            sampler.sampler_timesteps(self.num_steps, self.num_windows)  # raises if N < K
            if self.strength is not None:
                sampler.img2img_first_step(self.num_steps, self.strength)  # raises outside (0, 1] or for 0 steps
        else:
            if self.strength is not None:
                raise ValueError("img2img (strength) is implemented for the PeRFlow sampler, not the teacher's DDIM")
            if self.prediction_type not in solver.PREDICTION_TYPES:
                raise ValueError(
                    f"unknown teacher prediction_type {self.prediction_type!r}: use one of "
                    f"{', '.join(solver.PREDICTION_TYPES)} (the teacher's scheduler_config.json says which)"
                )
            if not 1 <= self.num_steps <= schedule.NUM_TRAIN_TIMESTEPS:
                raise ValueError(
                    f"{self.num_steps} DDIM steps: use 1 to {schedule.NUM_TRAIN_TIMESTEPS} (one per training timestep)"
                )


@dataclasses.dataclass(frozen=True, eq=False)
class Pipeline:
    """A model's networks as Flax modules, with the teacher's noise schedule (static under jit)."""

    unet: nn.Module
    text: TextEncoders
    vae: nn.Module
    alphas_cumprod: np.ndarray
    controlnets: tuple[nn.Module, ...] = ()

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(h, w, c) of the latents of height x width images: one image's noise."""
        factor = self.vae.config.downsampling_factor
        for name, size in (("height", height), ("width", width)):
            if size % factor:
                raise ValueError(f"{name} {size} is not a multiple of the VAE's downsampling factor {factor}")
        return (height // factor, width // factor, self.vae.config.latent_channels)


def make_generate(pipe: Pipeline, settings: GenerateSettings) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """``generate(params, ids, null_ids, noise, control=(), init_images=None) -> (images, latents)``, jittable.

    params: {"unet": the student's (method "perflow") or the teacher's ("ddim") parameters,
      "text": {"text_encoder": ..., ("text_encoder_2": ...)}, "vae": ..., and with ControlNets
      "controlnets": a tuple of their parameters, in ``pipe.controlnets``' order}.
    ids: ``Model.tokenize(prompts)``, "input_ids" [N, 77] int32 (and "input_ids_2" for SDXL;
      SDXL's size ids default to ``TextEncoders.size_ids``). null_ids: the same for the one negative
      prompt ([1, 77]), the unconditional branch of classifier-free guidance (unused at guidance 1).
    noise: [N, h, w, c] the initial latents z ~ N(0, I) (``Pipeline.latent_shape``).
    control: one control image batch [N, f h, f w, C] in [0, 1] per ControlNet of ``pipe`` (the user's edge,
      depth or pose maps at the image size), steering the UNet at ``settings.control_scales``.
    init_images: img2img (``settings.strength`` set, then required): [N, f h, f w, 3] in [-1, 1], encoded
      to the VAE posterior's mean (diffusers draws a posterior sample; its ``sample_mode="argmax"`` is
      this), times scaling_factor, and noised with ``noise`` to the first step's timestep.
    Returns images [N, f h, f w, 3] float32 in [0, 1] (f the VAE's downsampling factor) and the
    final latents [N, h, w, c] float32 before the VAE decode (scaled by its scaling_factor).
    """
    if settings.method == "perflow":
        solve = functools.partial(
            sampler.sample, num_windows=settings.num_windows, parameterization=settings.parameterization
        )
    else:
        solve = functools.partial(solver.ddim_sample, prediction_type=settings.prediction_type)
    steps = {"num_steps": settings.num_steps, "guidance": settings.guidance}
    img2img = settings.strength is not None
    if img2img:
        steps["first_step"] = sampler.img2img_first_step(settings.num_steps, settings.strength)
        first_timestep = int(sampler.sampler_timesteps(settings.num_steps, settings.num_windows)[steps["first_step"]])

    if len(settings.control_scales) != len(pipe.controlnets):
        raise ValueError(
            f"{len(settings.control_scales)} control scales for {len(pipe.controlnets)} ControlNets: give one each"
        )

    def generate(params, ids, null_ids, noise, control=(), init_images=None):
        n = noise.shape[0]
        if img2img != (init_images is not None):
            raise ValueError(
                "img2img needs init_images and settings.strength together: give both, or neither to draw from noise"
            )
        if img2img and init_images.shape[0] != n:
            raise ValueError(f"{init_images.shape[0]} init images but noise for {n} images: give one per image")
        if ids["input_ids"].shape[0] != n:
            raise ValueError(f"{ids['input_ids'].shape[0]} prompts but noise for {n} images: give one noise per prompt")
        if pipe.text.text_encoder_2 is not None and "input_ids_2" not in ids:
            raise ValueError("this is an SDXL model: ids need input_ids_2 as well; pass Model.tokenize(prompts)")
        check_control(control, noise.shape, pipe)
        cond = pipe.text.encode(params["text"], {**pipe.text.size_ids(n), **ids})
        null_cond = pipe.text.encode(params["text"], {**pipe.text.size_ids(1), **null_ids})
        null_cond = jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + x.shape[1:]), null_cond)
        apply = unet_apply(pipe.unet, params["unet"])
        if img2img:
            mean, _ = pipe.vae.apply({"params": params["vae"]}, init_images, method="encode")
            x0 = mean * pipe.vae.config.scaling_factor
            noise = sampler.add_noise(x0, noise.astype(jnp.float32), pipe.alphas_cumprod, first_timestep)
        if pipe.controlnets:
            controlnets = (pipe.controlnets, params["controlnets"], settings.control_scales, settings.guess_mode)
            apply = controlled_unet_apply(pipe.unet, params["unet"], *controlnets)
            cond, null_cond = {**cond, "control": tuple(control)}, {**null_cond, "control": tuple(control)}
            if settings.guess_mode:
                cond["control_weight"], null_cond["control_weight"] = jnp.ones(n), jnp.zeros(n)
        z = solve(apply, noise, cond, null_cond, pipe.alphas_cumprod, **steps)
        decoded = pipe.vae.apply({"params": params["vae"]}, z / pipe.vae.config.scaling_factor, method="decode")
        return jnp.clip((decoded.astype(jnp.float32) + 1.0) / 2.0, 0.0, 1.0), z

    return generate


def check_control(control: Sequence[Any], noise_shape: Sequence[int], pipe: Pipeline) -> None:
    """Raise ValueError unless ``control`` holds one [N, f h, f w, C] image batch per ControlNet of ``pipe``, for
    noise [N, h, w, c] (f: the VAE's downsampling factor; C: the ControlNet's conditioning_channels)."""
    if len(control) != len(pipe.controlnets):
        raise ValueError(f"{len(control)} control images for {len(pipe.controlnets)} ControlNets: give one each")
    n, h, w, _ = noise_shape
    f = pipe.vae.config.downsampling_factor
    for i, (image, module) in enumerate(zip(control, pipe.controlnets, strict=True)):
        expected = (n, h * f, w * f, module.config.conditioning_channels)
        if tuple(image.shape) != expected:
            raise ValueError(
                f"control image {i} is {tuple(image.shape)}; expected {expected} (images, height, width, channels) "
                f"for {n} images of {h * f} x {w * f} pixels"
            )


def seed_noise(seed: int, count: int, shape: Sequence[int], start: int = 0) -> np.ndarray:
    """[count, h, w, c] float32, images start .. start + count - 1: image j's noise is
    normal(fold_in(key(seed), j), shape), whatever the batch it is drawn in."""
    return np.asarray(_draw_noise(jnp.asarray(seed), start + jnp.arange(count), tuple(shape)))


@functools.partial(jax.jit, static_argnums=2)
def _draw_noise(seed: jax.Array, indices: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """One compilation per count and shape, whatever the seed and the first index (many batches reuse it)."""
    key = jax.random.key(seed)
    return jax.vmap(lambda j: jax.random.normal(jax.random.fold_in(key, j), shape, jnp.float32))(indices)


@dataclasses.dataclass
class Output:
    """One call's results. images: [B, H, W, 3] float32 in [0, 1]. latents: [B, h, w, c] float32, the
    final latents before the VAE decode (times scaling_factor). compile_seconds: 0 when this batch size
    was compiled before. run_seconds: the compiled function's run, inputs on the devices."""

    images: np.ndarray
    latents: np.ndarray
    compile_seconds: float
    run_seconds: float


class Generator:
    """A Pipeline's parameters on the devices and its one jitted prompts -> images function.

    ``params`` ({"unet", "text", "vae"} and any "controlnets", see ``make_generate``) are global arrays placed as the
    caller chose (replicated by ``load_generator``; a training run passes its sharded ones). The
    batch is split over all devices of ``mesh``, padded to a multiple of their count (the padding
    dropped from the results). One compilation per padded batch size: a caller that runs many
    batches passes ``pad_to`` (its batch size) so that a short last batch reuses the compilation.
    """

    def __init__(
        self,
        pipe: Pipeline,
        settings: GenerateSettings,
        params: dict[str, Any],
        tokenize: Callable[[list[str]], dict[str, np.ndarray]],
        mesh: jax.sharding.Mesh,
        negative_prompt: str = "",
    ):
        self.pipe, self.settings, self.params, self.tokenize, self.mesh = pipe, settings, params, tokenize, mesh
        self.negative_prompt = negative_prompt
        self.null_ids = sharding.place(tokenize([negative_prompt]), sharding.replicated(mesh))
        self._jitted = jax.jit(make_generate(pipe, settings), out_shardings=sharding.replicated(mesh))
        self._compiled: dict[int, Any] = {}

    def with_settings(self, settings: GenerateSettings) -> Generator:
        """A Generator of the same networks and parameters (not copied) that draws per ``settings``."""
        return Generator(self.pipe, settings, self.params, self.tokenize, self.mesh, self.negative_prompt)

    def inputs(
        self,
        prompts: Sequence[str],
        noise: np.ndarray,
        unet_params: Any = None,
        pad_to: int = 0,
        control=(),
        init_images: np.ndarray | None = None,
    ) -> tuple:
        """The compiled function's arguments: ``prompts`` (one per image) and ``noise`` [B, h, w, c], padded
        (to ``pad_to`` rows at least) and placed; ``unet_params`` in place of ``params["unet"]`` (e.g. a
        training run's EMA); ``control``: per ControlNet, one control image [f h, f w, C] in [0, 1] for every
        image, or one per image [B, f h, f w, C]; img2img's ``init_images`` [B, H, W, 3]."""
        count = len(prompts)
        if np.shape(noise)[0] != count:
            raise ValueError(f"noise for {np.shape(noise)[0]} images but {count} prompts: give one noise per prompt")
        bad = np.size(noise) - np.count_nonzero(np.isfinite(noise))
        if bad:
            raise ValueError(f"the initial noise holds {bad} NaN or infinite values: give finite N(0, I) noise")
        if init_images is not None and np.shape(init_images)[0] != count:
            raise ValueError(f"{np.shape(init_images)[0]} init images but {count} prompts: give one init image each")
        padded = -(-max(count, pad_to) // self.mesh.size) * self.mesh.size
        ids = {k: _pad(v, padded, "edge") for k, v in self.tokenize(list(prompts)).items()}
        noise = _pad(np.asarray(noise, np.float32), padded, "constant")
        params = self.params if unet_params is None else {**self.params, "unet": unet_params}
        batch = sharding.batch_sharding(self.mesh)
        for i, c in enumerate(control):
            if np.ndim(c) == 4 and np.shape(c)[0] != count:
                raise ValueError(
                    f"control {i} holds {np.shape(c)[0]} images for {count} prompts: give one per prompt, or one "
                    "[H, W, C] image for all"
                )
        control = tuple(
            _pad(np.asarray(c, np.float32), padded, "edge")
            if np.ndim(c) == 4
            else np.broadcast_to(np.asarray(c, np.float32), (padded, *np.shape(c)))
            for c in control
        )
        args = (
            params,
            sharding.place(ids, batch),
            self.null_ids,
            sharding.place(noise, batch),
            sharding.place(control, batch),
        )
        if init_images is None:
            return args
        return args + (sharding.place(_pad(np.asarray(init_images, np.float32), padded, "edge"), batch),)

    def compiled(self, args: tuple) -> tuple[Any, float]:
        """(the function compiled for ``args``' batch size, seconds spent compiling it now: 0 if cached)."""
        padded = args[3].shape[0]
        if padded in self._compiled:
            return self._compiled[padded], 0.0
        start = time.perf_counter()
        self._compiled[padded] = self._jitted.lower(*args).compile()
        return self._compiled[padded], time.perf_counter() - start

    def __call__(
        self,
        prompts: Sequence[str],
        noise: np.ndarray,
        unet_params: Any = None,
        pad_to: int = 0,
        control=(),
        init_images: np.ndarray | None = None,
    ) -> Output:
        """Images of ``prompts`` (one per image) from ``noise`` [B, h, w, c] (channels-last), steered by ``control``
        (see ``inputs``) when the Pipeline has ControlNets, and with ``settings.strength`` from ``init_images``
        [B, H, W, 3] in [-1, 1] (img2img)."""
        args = self.inputs(prompts, noise, unet_params, pad_to, control, init_images)
        function, compile_seconds = self.compiled(args)
        start = time.perf_counter()
        images, latents = jax.block_until_ready(function(*args))
        run_seconds = time.perf_counter() - start
        count = len(prompts)
        return Output(np.asarray(images)[:count], np.asarray(latents)[:count], compile_seconds, run_seconds)


def _pad(x: np.ndarray, size: int, mode: str) -> np.ndarray:
    """``x`` [B, ...] padded along the batch to ``size`` rows (copies of the last, or zeros)."""
    return np.pad(x, [(0, size - x.shape[0])] + [(0, 0)] * (x.ndim - 1), mode=mode)


def load_generator(
    description: Description,
    settings: GenerateSettings,
    *,
    weights: str = "ema",
    height: int,
    dtype: str = "float32",
    negative_prompt: str = "",
    loras: Sequence[tuple[os.PathLike, float]] = (),
    controlnets: Sequence[str] = (),
) -> Generator:
    """A Generator of the described model, computing in ``dtype``, its parameters replicated on every device.

    The UNet is a WORKDIR's student (its ``weights``, "ema" or "student") for the PeRFlow sampler;
    otherwise the folder's (a PeRFlow folder's student, or the teacher for DDIM). SDXL's size ids say ``height``.
    ``loras``: (UNet LoRA file, scale) pairs merged into the UNet in order (``lora.merge_files``).
    ``controlnets``: the names of ControlNets converted into the model folder (a WORKDIR's teacher folder), in
    the order of ``settings.control_scales`` and of the control images.
    """
    if description.workdir and settings.method == "perflow":
        model = load_trained(description.path, step=description.step, weights=weights).model
    else:
        model = load_model(description.folder)
    if loras:
        model.params["unet"] = lora.merge_files(weights_io.cast_params(model.params["unet"], "float32"), loras)
    compute = weights_io.DTYPES[dtype]
    text_names = model.text_encoders
    encoders = [model.module(n, dtype=compute, attention_backend="auto") for n in text_names]
    loaded = load_controlnets(description.folder, controlnets) if controlnets else {}
    pipe = Pipeline(
        unet=model.module("unet", dtype=compute, attention_backend="auto"),
        text=TextEncoders(*encoders, resolution=height),
        vae=model.module("vae", dtype=compute),
        alphas_cumprod=model.alphas_cumprod(),
        controlnets=tuple(
            models.from_config("ControlNetModel", config, dtype=compute, attention_backend="auto")
            for config, _ in loaded.values()
        ),
    )
    mesh = sharding.make_mesh((-1, 1))
    params = {
        "unet": model.params["unet"],
        "text": {n: model.params[n] for n in text_names},
        "vae": model.params["vae"],
        **({"controlnets": tuple(p for _, p in loaded.values())} if loaded else {}),
    }
    params = sharding.place(weights_io.cast_params(params, dtype), sharding.replicated(mesh))
    return Generator(pipe, settings, params, model.tokenize, mesh, negative_prompt)
