"""``python -m perflow_jax.sample``: images from prompts with a PeRFlow student, or its teacher's DDIM.

--model is a training run's WORKDIR (its newest checkpoint's EMA weights unless --step or --weights
say otherwise; the VAE, text encoders and tokenizers come from the run's teacher folder), or a
model folder (converted or diffusers) whose scheduler is the PeRFlowScheduler: an export of this
project or the authors' release. ``--teacher-ddim STEPS`` samples the teacher instead (a WORKDIR's
teacher folder, or any Stable Diffusion folder) with DDIM, for comparison.

One jitted function runs the text encoders, the sampler with classifier-free guidance and the VAE
decode; the images (the prompts times --num-images) are drawn --batch-size at a time (default 16,
with a progress bar), each batch split over all devices. Images are ordered
prompt by prompt: image j = p N + i is prompt p's i-th (N = --num-images), as in diffusers.

img2img: ``--init-image IMAGE --strength S`` (S default 0.8, as in diffusers) starts every image from
IMAGE (read as RGB; its size must be --height x --width, else it is refused naming both: resize it
first) as diffusers' StableDiffusionImg2ImgPipeline does with the PeRFlowScheduler: of the --steps N
steps, the last min(int(N S), N) run (S = 0.75 at 4 steps: timesteps 750, 500, 250), from the image's
latents (the VAE posterior's mean, times scaling_factor; diffusers draws a posterior sample, its
``retrieve_latents`` with ``sample_mode="argmax"`` gives this) forward-diffused with the image's noise
to the first of them. S = 1 still keeps a trace of the image (sqrt(alphas_cumprod[999]) of it). The
noise below is then that forward diffusion's noise. The PeRFlow sampler only (not --teacher-ddim).

Noise: image j starts from ``jax.random.normal(jax.random.fold_in(jax.random.key(seed), j), (h, w, c))``
(channels-last; h = H / f and w = W / f with f the VAE's downsampling factor, c its latent channels),
so the same seed gives the same images and every image, hence every prompt, has its own noise.

ControlNet: ``--control IMAGE --controlnet NAME [--control-scale S]`` (repeatable pairs, in order,
for several ControlNets whose residuals are summed) steers every image with a ControlNet converted
into the model folder (``python -m perflow_jax.convert --controlnet DIR:NAME``; for a WORKDIR, into
its teacher folder), as diffusers' StableDiffusionControlNetPipeline does. IMAGE is the control
signal itself, already preprocessed (an edge, depth or pose map: this project ships no annotators),
a PNG or JPEG at exactly the image size (--height x --width; other sizes are refused, naming the
expected one, rather than resized), RGB or grayscale (repeated to RGB, as diffusers converts it).
--control-scale is given for every pair or for none (each 1.0); ``--guess-mode`` is diffusers'
guess mode (residuals weighted from 0.1 to 1 with depth, none in the unconditional CFG branch).

Files for comparisons across frameworks: .npy, float32, in diffusers' layout [images, c, h, w]
(this project computes channels-last, [images, h, w, c]; the files are transposed on the way):
- ``--init-noise``: the initial noise z_1 ~ N(0, I) to start from instead of the seed's. The same
  file can be passed as the ``latents=`` argument of a diffusers pipeline (its DDIM and PeRFlow
  schedulers start at sigma 1, so it is used unscaled) with the same prompts, in the same order,
  and ``num_images_per_prompt=N``.
- ``--save-noise``: the initial noise this run used (the seed's, or --init-noise's).
- ``--save-latents``: the final latents before the VAE decode, times the VAE's scaling_factor, as a
  diffusers pipeline returns them with ``output_type="latent"``; ``vae.decode(latents /
  vae.config.scaling_factor)`` makes them images.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from perflow_jax import checkpoint, compile_cache, console, image_io, lora, models, pipeline, sharding
from perflow_jax.weights import COMPUTE_DTYPES, check_out

DEFAULT_STEPS = 4
STUDENT_GUIDANCE = 4.5  # the released SD1.5 setting at 4 steps
TEACHER_GUIDANCE = 7.5  # Stable Diffusion's usual setting
DEFAULT_STRENGTH = 0.8  # diffusers' img2img default
DEFAULT_BATCH_SIZE = 16  # images per jitted call: SD1.5 at 512 px in float32 fits a 16 GB accelerator
WEIGHTS = tuple(checkpoint.WEIGHTS)


class SampleError(ValueError):
    """The arguments do not fit together or do not fit the model."""


@dataclasses.dataclass(frozen=True)
class Options:
    """The command line's options, one field per flag (``--help`` and the module docstring say what each does)."""

    model: str | os.PathLike
    prompts: Sequence[str] = ()
    out: Path | None = None
    steps: int | None = None
    guidance: float | None = None
    negative_prompt: str | None = None
    seed: int = 0
    num_images: int = 1
    height: int | None = None
    width: int | None = None
    weights: str | None = None
    step: int | None = None
    teacher_ddim: int | None = None
    init_noise: Path | None = None
    save_noise: Path | None = None
    save_latents: Path | None = None
    singles: bool = False
    dtype: str = "float32"
    batch_size: int = DEFAULT_BATCH_SIZE
    lora: Sequence[str] = ()
    init_image: Path | None = None
    strength: float | None = None
    control: Sequence[Path] = ()
    controlnet: Sequence[str] = ()
    control_scale: Sequence[float] = ()
    guess_mode: bool = False


@dataclasses.dataclass(frozen=True)
class Plan:
    """A sampling run as the options and the model's config files decide it, checked; no weights read.

    weights: a WORKDIR student's weights ("ema" or "student"); None when the UNet is the folder's
    (a PeRFlow folder's student, or the teacher for DDIM). latent_shape: (h, w, c) of one image's noise.
    """

    description: pipeline.Description
    settings: pipeline.GenerateSettings
    weights: str | None
    height: int
    width: int
    latent_shape: tuple[int, int, int]


def make_plan(options: Options) -> Plan:
    """Check the options against each other and against the model's config files (no weights are read).

    ``steps`` defaults to 4; ``guidance`` to 4.5 for the student and 7.5 for the teacher's DDIM;
    ``weights`` to "ema" for a WORKDIR; ``height`` and ``width`` to the resolution the model was
    trained at. Raises SampleError (or the sampler's ValueError for steps below the window count).
    """
    o = options
    if o.dtype not in COMPUTE_DTYPES:
        raise SampleError(f"--dtype {o.dtype!r}: use one of {', '.join(COMPUTE_DTYPES)}")
    if o.steps is not None and o.teacher_ddim is not None:
        raise SampleError("--steps counts the student's steps: give the teacher's DDIM steps as --teacher-ddim STEPS")
    if o.steps is not None and o.steps < 1:
        raise SampleError(f"--steps {o.steps}: give at least 1 (the model's window count, usually 4)")
    if o.guidance is not None and not math.isfinite(o.guidance):
        raise SampleError(f"--guidance {o.guidance}: give a finite classifier-free guidance scale, 1 or more")
    if o.guidance is not None and o.guidance < 1:
        raise SampleError(
            f"--guidance {o.guidance}: classifier-free guidance scales below 1 move away from the prompt; "
            "use 1 (no guidance) or more"
        )
    if o.strength is not None and o.init_image is None:
        raise SampleError(f"--strength {o.strength} is img2img's: give the image to start from as --init-image IMAGE")
    if o.strength is not None and not 0 < o.strength <= 1:
        raise SampleError(f"--strength {o.strength}: give a value in (0, 1] (the share of the steps that run)")
    if o.init_image is not None and o.teacher_ddim is not None:
        raise SampleError("--init-image is implemented for the PeRFlow student's sampler: drop --teacher-ddim")
    if o.negative_prompt is not None and o.guidance == 1:
        raise SampleError("--negative-prompt has no effect with --guidance 1 (no unconditional pass): raise --guidance")
    for name, size in (("height", o.height), ("width", o.width)):
        if size is not None and size < 1:
            raise SampleError(f"--{name} {size}: give a positive number of pixels")
    if o.weights is not None and o.weights not in WEIGHTS:
        raise SampleError(f"--weights {o.weights!r}: use one of {', '.join(WEIGHTS)}")
    if o.teacher_ddim is not None and (o.weights is not None or o.step is not None):
        option = "--weights" if o.weights is not None else "--step"
        raise SampleError(
            f"{option} chooses the student's checkpoint, but --teacher-ddim samples the teacher: drop one"
        )
    if o.weights is not None and not checkpoint.is_workdir(o.model):
        raise SampleError(
            f"--weights {o.weights} chooses a training run's EMA or student weights, but {o.model} is a model "
            "folder with one UNet: leave --weights out, or give the run's WORKDIR"
        )
    try:
        description = pipeline.describe(o.model, step=o.step)
    except (checkpoint.CheckpointError, ValueError) as error:
        raise SampleError(str(error)) from error

    vae = models.vae.VAEConfig.from_dict(pipeline.read_json(description.folder / "vae" / "config.json"))
    f = vae.downsampling_factor
    height, width = o.height or description.resolution, o.width or description.resolution
    for name, size in (("height", height), ("width", width)):
        if size % f:
            raise SampleError(
                f"--{name} {size} is not a multiple of the VAE's downsampling factor {f}: use "
                f"{max(f, size // f * f)} or {(size // f + 1) * f}"
            )
    if (description.folder / "text_encoder_2").is_dir() and height != width:
        raise SampleError(
            f"--height {height} and --width {width}: SDXL models are sampled here at square sizes only (one "
            "resolution for the size conditioning); give --height equal to --width"
        )
    settings = dataclasses.replace(_settings(o, description), **_control_settings(o, description))
    weights = (o.weights or "ema") if description.workdir and o.teacher_ddim is None else None
    return Plan(description, settings, weights, height, width, (height // f, width // f, vae.latent_channels))


def _settings(o: Options, description: pipeline.Description) -> pipeline.GenerateSettings:
    """The student's PeRFlow sampler, or with --teacher-ddim the teacher's DDIM."""
    if o.teacher_ddim is not None:
        if not description.workdir and description.perflow is not None:
            raise SampleError(
                f"{o.model} holds a PeRFlow student (its scheduler is the PeRFlowScheduler), not a teacher: "
                "--teacher-ddim needs the teacher's folder, or the training run's WORKDIR (whose config names it)"
            )
        scheduler = pipeline.read_json(description.folder / "scheduler" / "scheduler_config.json")
        return pipeline.GenerateSettings(
            method="ddim",
            num_steps=o.teacher_ddim,
            guidance=o.guidance or TEACHER_GUIDANCE,
            prediction_type=scheduler.get("prediction_type", "epsilon"),
        )
    if description.perflow is None:
        scheduler = pipeline.read_json(description.folder / "scheduler" / "scheduler_config.json")
        raise SampleError(
            f"{o.model} is a Stable Diffusion folder whose scheduler is {scheduler.get('_class_name')}, not a "
            "PeRFlow student: sample it with --teacher-ddim STEPS, or give a training WORKDIR or a folder with a "
            f"{pipeline.PERFLOW_SCHEDULER}"
        )
    parameterization, num_windows = description.perflow
    num_steps = o.steps or DEFAULT_STEPS
    strength = None
    if o.init_image is not None:
        strength = DEFAULT_STRENGTH if o.strength is None else o.strength
        if int(num_steps * strength) == 0:
            raise SampleError(
                f"--strength {strength} of {num_steps} steps runs int({num_steps} x {strength}) = 0 steps: give "
                f"--strength {1 / num_steps:g} or more, or more --steps"
            )
    return pipeline.GenerateSettings(
        method="perflow",
        num_steps=num_steps,
        guidance=o.guidance or STUDENT_GUIDANCE,
        parameterization=parameterization,
        num_windows=num_windows,
        strength=strength,
    )


def _control_settings(o: Options, description: pipeline.Description) -> dict[str, Any]:
    """The ControlNets' conditioning scales and guess mode, after checking the --control / --controlnet pairs."""
    if len(o.control) != len(o.controlnet):
        raise SampleError(
            f"{len(o.control)} --control images for {len(o.controlnet)} --controlnet names: give them in pairs, "
            "--control IMAGE --controlnet NAME (one pair per ControlNet)"
        )
    if o.control_scale and len(o.control_scale) != len(o.controlnet):
        raise SampleError(
            f"{len(o.control_scale)} --control-scale values for {len(o.controlnet)} ControlNets: give one per "
            "--controlnet, or none (each 1.0)"
        )
    if o.guess_mode and not o.controlnet:
        raise SampleError("--guess-mode is a ControlNet mode: add --control IMAGE --controlnet NAME, or drop it")
    available = pipeline.controlnet_names(description.folder)
    unknown = [name for name in o.controlnet if name not in available]
    if unknown:
        raise SampleError(
            f"--controlnet {unknown[0]}: {description.folder} has no such ControlNet; it has "
            f"{', '.join(available) or 'none'}: convert one into it with python -m perflow_jax.convert "
            "--controlnet DIR:NAME"
        )
    for path in o.control:
        if not Path(path).is_file():
            raise SampleError(f"--control {path} does not exist: give the control image (an edge, depth or pose map)")
    scales = tuple(float(x) for x in o.control_scale) or (1.0,) * len(o.controlnet)
    bad = [x for x in scales if not math.isfinite(x)]
    if bad:
        raise SampleError(f"--control-scale {bad[0]}: give a finite number (1.0 is the ControlNet as trained)")
    return {"control_scales": scales, "guess_mode": o.guess_mode}


def read_control_image(path: Path, height: int, width: int, channels: int = 3) -> np.ndarray:
    """[height, width, 3] float32 in [0, 1]: an RGB or grayscale (repeated to RGB) image file; SampleError for
    another size, another mode (RGBA, CMYK, ...) or a ControlNet whose ``channels`` are not 3."""
    if channels != 3:
        raise SampleError(
            f"--control {path}: this ControlNet takes {channels}-channel control inputs, not RGB images: sample "
            "with a ControlNet of 3 conditioning channels (diffusers' image ControlNets)"
        )
    return _read_image(path, "--control", height, width, modes=("RGB", "L")).astype(np.float32) / 255.0


def initial_noise(options: Options, plan: Plan, count: int) -> np.ndarray:
    """[count, h, w, c] float32: --init-noise's (checked, NCHW on disk), else the seed's."""
    if options.init_noise is None:
        return pipeline.seed_noise(options.seed, count, plan.latent_shape)
    given = np.load(options.init_noise)
    h, w, c = plan.latent_shape
    expected = (count, c, h, w)
    if given.shape != expected or not np.issubdtype(given.dtype, np.floating):
        raise SampleError(
            f"--init-noise {options.init_noise} holds {given.dtype} {given.shape}; expected float32 {expected}: "
            f"{len(options.prompts)} prompts x {options.num_images} images, {c} latent channels, {h} x {w} "
            f"latents for {plan.height} x {plan.width} pixels, in diffusers' [images, c, h, w] layout"
        )
    bad = given.size - np.count_nonzero(np.isfinite(given))
    if bad:
        raise SampleError(f"--init-noise {options.init_noise} holds {bad} NaN or infinite values: give finite noise")
    return image_io.to_nhwc(given)


def read_init_image(path: Path, height: int, width: int) -> np.ndarray:
    """--init-image as [height, width, 3] float32 in [-1, 1] (RGB, x / 255 * 2 - 1 as diffusers' image
    processor computes it); a missing or unreadable file, or another size, is refused."""
    pixels = _read_image(path, "--init-image", height, width)
    return pixels.astype(np.float32) / np.float32(255) * np.float32(2) - np.float32(1)


def _read_image(path: Path, flag: str, height: int, width: int, modes: tuple[str, ...] | None = None) -> np.ndarray:
    """[height, width, 3] uint8: the image file ``path`` converted to RGB; SampleError naming ``flag`` for a missing
    or unreadable file, a mode outside ``modes`` (None: any), or another size."""
    if not Path(path).is_file():
        raise SampleError(f"{flag} {path} does not exist: give an image file (PNG, JPEG, ...)")
    try:
        with Image.open(path) as image:
            mode = image.mode
            pixels = np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise SampleError(f"{flag} {path} is not a readable image ({error}): give a PNG or JPEG file") from error
    if modes is not None and mode not in modes:
        raise SampleError(
            f"{flag} {path} is a {mode} image; it should be {' or '.join(modes)}: convert it, e.g. with PIL's "
            "image.convert('RGB')"
        )
    if pixels.shape[:2] != (height, width):
        raise SampleError(
            f"{flag} {path} is {pixels.shape[0]} x {pixels.shape[1]} pixels (height x width) but the images "
            f"are {height} x {width}: resize the image, or give --height {pixels.shape[0]} --width {pixels.shape[1]}"
        )
    return pixels


def load(options: Options, plan: Plan) -> pipeline.Generator:
    """The planned model on the devices, with its jitted generate."""
    return pipeline.load_generator(
        plan.description,
        plan.settings,
        weights=plan.weights or "ema",
        height=plan.height,
        dtype=options.dtype,
        negative_prompt=options.negative_prompt or "",
        loras=[lora.parse_file_arg(arg) for arg in options.lora],
        controlnets=options.controlnet,
    )


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line of a text file; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise SampleError(f"--prompts {path} does not exist: give a text file with one prompt per line")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise SampleError(f"--prompts {path} holds no prompts: write one prompt per line")
    return prompts


def sample(options: Options, log: Callable[[str], Any] = print) -> pipeline.Output:
    """Sample ``num_images`` images of each prompt and write the grid PNG ``out`` (and the files asked for).

    Single images go beside ``out`` as ``<stem>_<j>.png`` (j as in the module docstring).
    """
    o = options
    if not o.prompts:
        raise SampleError("no prompts: give --prompt TEXT or --prompts FILE")
    if o.num_images < 1:
        raise SampleError(f"--num-images {o.num_images}: give at least 1 (images per prompt)")
    if o.batch_size < 1:
        raise SampleError(f"--batch-size {o.batch_size}: give at least 1 (images per jitted call)")
    if o.out is None or Path(o.out).suffix.lower() != ".png":
        raise SampleError(f"--out {o.out}: the grid is written as a PNG; give a path ending in .png")
    if o.init_noise is not None and not Path(o.init_noise).is_file():
        raise SampleError(f"--init-noise {o.init_noise} does not exist: give a .npy file (see --help for its layout)")
    for flag, path in (("--out", o.out), ("--save-noise", o.save_noise), ("--save-latents", o.save_latents)):
        if path is not None:
            check_out(path, {"--model": o.model}, SampleError, flag)
    plan = make_plan(o)
    batch = [prompt for prompt in o.prompts for _ in range(o.num_images)]
    control = tuple(
        read_control_image(path, plan.height, plan.width, _conditioning_channels(plan, name))
        for path, name in zip(o.control, o.controlnet, strict=True)
    )
    noise = initial_noise(o, plan, len(batch))
    init_image = None if o.init_image is None else read_init_image(o.init_image, plan.height, plan.width)

    start = time.perf_counter()
    generator = load(o, plan)
    source = f"the student of {o.model} ({plan.weights} weights)" if plan.weights else str(plan.description.folder)
    log(f"loaded {source} in {time.perf_counter() - start:.1f} s")
    result = generate_in_batches(generator, batch, noise, o.batch_size, control, init_image)
    what = "the teacher's DDIM" if plan.settings.method == "ddim" else "PeRFlow"
    if init_image is not None:
        what += f" img2img from {o.init_image} at strength {plan.settings.strength}"
    log(
        f"{what}, {plan.settings.num_steps} steps, guidance {plan.settings.guidance}: compiled in "
        f"{result.compile_seconds:.1f} s; {len(batch)} images of {plan.height} x {plan.width} in "
        f"{result.run_seconds:.3f} s ({1e3 * result.run_seconds / len(batch):.1f} ms per image) on "
        f"{generator.mesh.size} {jax.devices()[0].platform} device(s)"
    )
    if jax.process_index() == 0:
        _write(o, noise, result, log)
    return result


def generate_in_batches(
    generator: pipeline.Generator,
    prompts: Sequence[str],
    noise: np.ndarray,
    batch_size: int,
    control=(),
    init_image: np.ndarray | None = None,
) -> pipeline.Output:
    """``generator``'s images of ``prompts`` from ``noise``, ``batch_size`` at a time (one compilation; a
    progress bar on standard error when there is more than one batch), joined in order; ``control``: one
    control image per ControlNet, for every image; ``init_image`` [H, W, 3] in [-1, 1]: img2img's start for
    every image."""
    outputs = []
    starts = range(0, len(prompts), batch_size)
    bar = tqdm(starts, desc="sampling", unit="batch", disable=len(starts) < 2, dynamic_ncols=True, file=sys.stderr)
    for start in bar:
        end = start + batch_size
        count = len(prompts[start:end])
        init_images = None if init_image is None else np.broadcast_to(init_image, (count, *init_image.shape))
        pad_to = min(batch_size, len(prompts))
        outputs.append(
            generator(prompts[start:end], noise[start:end], pad_to=pad_to, control=control, init_images=init_images)
        )
    return pipeline.Output(
        np.concatenate([o.images for o in outputs]),
        np.concatenate([o.latents for o in outputs]),
        sum(o.compile_seconds for o in outputs),
        sum(o.run_seconds for o in outputs),
    )


def _conditioning_channels(plan: Plan, name: str) -> int:
    """The control input channels of ControlNet ``name`` of the planned model's folder (3 for images)."""
    config = pipeline.read_json(plan.description.folder / pipeline.CONTROLNET_FOLDER / name / "config.json")
    return int(config.get("conditioning_channels", 3))


def _write(o: Options, noise: np.ndarray, result: pipeline.Output, log: Callable[[str], Any]) -> None:
    """The grid, and the single images and .npy files asked for."""
    out = Path(o.out)
    image_io.save_png(image_io.grid(result.images), out)
    written = [str(out)]
    if o.singles:
        for j, image in enumerate(result.images):
            image_io.save_png(image_io.grid(image[None], columns=1), out.with_name(f"{out.stem}_{j:03d}.png"))
        written.append(f"{len(result.images)} single images {out.stem}_XXX.png")
    for path, array in ((o.save_noise, noise), (o.save_latents, result.latents)):
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            np.save(path, image_io.to_nchw(array))
            written.append(str(path))
    log(f"wrote {', '.join(written)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m perflow_jax.sample", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, metavar="PATH", help="WORKDIR or PeRFlow model folder (or gs:// URL)")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", metavar="TEXT", help="one prompt")
    prompt.add_argument("--prompts", type=Path, metavar="FILE", help="one prompt per line (blank lines skipped)")
    parser.add_argument("--out", type=Path, required=True, metavar="PNG", help="the grid PNG to write")
    parser.add_argument("--steps", type=int, help=f"student steps, at least its window count (default {DEFAULT_STEPS})")
    parser.add_argument("--guidance", type=float, help=f"CFG scale >= 1 ({STUDENT_GUIDANCE}; DDIM {TEACHER_GUIDANCE})")
    parser.add_argument("--negative-prompt", help="the unconditional branch's prompt (default the empty prompt)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    parser.add_argument("--num-images", type=int, default=1, help="images per prompt (default 1)")
    parser.add_argument("--height", type=int, help="image height in pixels (default the training resolution)")
    parser.add_argument("--width", type=int, help="image width in pixels (default the training resolution)")
    parser.add_argument("--weights", choices=WEIGHTS, help="a WORKDIR's EMA (default) or raw student weights")
    parser.add_argument("--step", type=int, help="a WORKDIR's checkpoint step (default the newest)")
    parser.add_argument("--teacher-ddim", type=int, metavar="STEPS", help="sample the teacher with DDIM instead")
    parser.add_argument("--init-noise", type=Path, metavar="NPY", help="initial noise [images, c, h, w] to start from")
    parser.add_argument("--save-noise", type=Path, metavar="NPY", help="write the initial noise used [images, c, h, w]")
    parser.add_argument("--save-latents", type=Path, metavar="NPY", help="write the final latents [images, c, h, w]")
    parser.add_argument("--singles", action="store_true", help="also write each image beside --out as STEM_XXX.png")
    parser.add_argument("--dtype", default="float32", choices=COMPUTE_DTYPES, help="compute dtype (default float32)")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        help=f"images per jitted call (default {DEFAULT_BATCH_SIZE})",
    )
    parser.add_argument("--init-image", type=Path, metavar="IMAGE", help="img2img: the image to start from")
    parser.add_argument("--strength", type=float, help=f"img2img: share of steps run, (0, 1] ({DEFAULT_STRENGTH})")
    parser.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]", help=lora.SAMPLE_HELP)
    parser.add_argument(
        "--control", action="append", default=[], type=Path, metavar="IMAGE", help="a control image (with --controlnet)"
    )
    parser.add_argument(
        "--controlnet",
        action="append",
        default=[],
        metavar="NAME",
        help="a ControlNet of the model folder, per --control",
    )
    parser.add_argument(
        "--control-scale", action="append", default=[], type=float, metavar="S", help="per --controlnet (default 1.0)"
    )
    parser.add_argument("--guess-mode", action="store_true", help="diffusers' ControlNet guess mode")
    parser.add_argument("--compilation-cache", metavar="DIR", help=compile_cache.FLAG_HELP)
    parser.add_argument("--verbose", action="store_true", help=console.VERBOSE_HELP)
    args = parser.parse_args(argv)
    console.set_log_levels(args.verbose)
    try:
        sharding.initialize_distributed()
        prompts = read_prompts(args.prompts) if args.prompts is not None else [args.prompt]
        options = {field.name: getattr(args, field.name) for field in dataclasses.fields(Options)}
        with compile_cache.cache_in(args.compilation_cache):
            sample(Options(**{**options, "prompts": prompts}))
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
