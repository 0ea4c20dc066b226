"""``python -m perflow_jax.sample``: images from prompts with a PeRFlow student, or its teacher's DDIM.

    python -m perflow_jax.sample --model PATH (--prompt TEXT | --prompts FILE) --out grid.png
        [--steps 4] [--guidance W] [--negative-prompt TEXT] [--seed S] [--num-images N]
        [--height H] [--width W] [--weights ema|student] [--step N] [--teacher-ddim STEPS]
        [--init-noise NPY] [--save-noise NPY] [--save-latents NPY] [--singles] [--dtype float32|bfloat16]

PATH is a training run's WORKDIR (its newest checkpoint's EMA weights unless --step or --weights
say otherwise; the VAE, text encoders and tokenizers come from the run's teacher folder), or a
model folder (converted or diffusers) whose scheduler is the PeRFlowScheduler: an export of this
project or the authors' release. ``--teacher-ddim STEPS`` samples the teacher instead (a WORKDIR's
teacher folder, or any Stable Diffusion folder) with DDIM, for comparison.

One jitted function runs the text encoders, the sampler with classifier-free guidance and the VAE
decode; the batch (the prompts times --num-images) is split over all devices. Images are ordered
prompt by prompt: image j = p N + i is prompt p's i-th (N = --num-images), as in diffusers.

Noise: image j starts from ``jax.random.normal(jax.random.fold_in(jax.random.key(seed), j), (h, w, c))``
(channels-last; h = H / f and w = W / f with f the VAE's downsampling factor, c its latent channels),
so the same seed gives the same images and every image, hence every prompt, has its own noise.

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
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from perflow_jax import checkpoint, generate, models, pipeline, sharding, step
from perflow_jax.weights import COMPUTE_DTYPES, DTYPES, cast_params

DEFAULT_STEPS = 4
STUDENT_GUIDANCE = 4.5  # the released SD1.5 setting at 4 steps
TEACHER_GUIDANCE = 7.5  # Stable Diffusion's usual setting
WEIGHTS = tuple(checkpoint.WEIGHTS)


class SampleError(ValueError):
    """The arguments do not fit together or do not fit the model."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """A sampling run as the arguments and the model's config files decide it, checked; no weights read.

    model: the --model path. folder: the pipeline folder whose VAE, text encoders, tokenizers and
    scheduler are used (a WORKDIR's teacher folder; else ``model``). which, step: a WORKDIR
    student's weights ("ema" or "student") and checkpoint step; None when the UNet is ``folder``'s
    (a PeRFlow folder's student, or the teacher for DDIM). settings: the sampler (method "perflow"
    or "ddim"). height, width: image size in pixels. latent_shape: (h, w, c) of one image's noise.
    """

    model: Path
    folder: Path
    which: str | None
    step: int | None
    settings: generate.GenerateSettings
    height: int
    width: int
    latent_shape: tuple[int, int, int]
    negative_prompt: str
    dtype: str


def make_plan(
    model: str | Path,
    *,
    steps: int | None = None,
    guidance: float | None = None,
    teacher_ddim: int | None = None,
    negative_prompt: str | None = None,
    weights: str | None = None,
    step: int | None = None,
    height: int | None = None,
    width: int | None = None,
    dtype: str = "float32",
) -> Plan:
    """Check the arguments against each other and against the model's config files (no weights are read).

    ``steps`` defaults to 4; ``guidance`` to 4.5 for the student and 7.5 for the teacher's DDIM;
    ``weights`` to "ema" for a WORKDIR; ``height`` and ``width`` to the resolution the model was
    trained at. Raises SampleError (or the sampler's ValueError for steps below the window count).
    """
    model = Path(model)
    if dtype not in COMPUTE_DTYPES:
        raise SampleError(f"--dtype {dtype!r}: use one of {', '.join(COMPUTE_DTYPES)}")
    if steps is not None and teacher_ddim is not None:
        raise SampleError("--steps counts the student's steps: give the teacher's DDIM steps as --teacher-ddim STEPS")
    if steps is not None and steps < 1:
        raise SampleError(f"--steps {steps}: give at least 1 (the model's window count, usually 4)")
    if guidance is not None and guidance < 1:
        raise SampleError(
            f"--guidance {guidance}: classifier-free guidance scales below 1 move away from the prompt; "
            "use 1 (no guidance) or more"
        )
    if negative_prompt is not None and guidance == 1:
        raise SampleError("--negative-prompt has no effect with --guidance 1 (no unconditional pass): raise --guidance")
    for name, size in (("height", height), ("width", width)):
        if size is not None and size < 1:
            raise SampleError(f"--{name} {size}: give a positive number of pixels")
    if weights is not None and weights not in WEIGHTS:
        raise SampleError(f"--weights {weights!r}: use one of {', '.join(WEIGHTS)}")

    workdir = checkpoint.is_workdir(model)
    if teacher_ddim is not None and (weights is not None or step is not None):
        option = "--weights" if weights is not None else "--step"
        raise SampleError(
            f"{option} chooses the student's checkpoint, but --teacher-ddim samples the teacher: drop one"
        )
    if not workdir and weights is not None:
        raise SampleError(
            f"--weights {weights} chooses a training run's EMA or student weights, but {model} is a model folder "
            "with one UNet: leave --weights out, or give the run's WORKDIR"
        )
    if not workdir and step is not None:
        raise SampleError(
            f"--step {step} names a training checkpoint, but {model} is a model folder, not a training run's "
            "WORKDIR: leave --step out, or give the WORKDIR"
        )

    folder, perflow, resolution, step = _model_facts(model, workdir, step)
    vae = models.from_config("AutoencoderKL", _read_json(folder / "vae" / "config.json"))
    f = generate.vae_factor(vae)
    height, width = height or resolution, width or resolution
    for name, size in (("height", height), ("width", width)):
        if size % f:
            raise SampleError(
                f"--{name} {size} is not a multiple of the VAE's downsampling factor {f}: use "
                f"{max(f, size // f * f)} or {(size // f + 1) * f}"
            )
    if (folder / "text_encoder_2").is_dir() and height != width:
        raise SampleError(
            f"--height {height} and --width {width}: SDXL models are sampled here at square sizes only (one "
            "resolution for the size conditioning); give --height equal to --width"
        )

    if teacher_ddim is not None:
        if not workdir and perflow is not None:
            raise SampleError(
                f"{model} holds a PeRFlow student (its scheduler is the PeRFlowScheduler), not a teacher: "
                "--teacher-ddim needs the teacher's folder, or the training run's WORKDIR (whose config names it)"
            )
        prediction_type = _read_json(folder / "scheduler" / "scheduler_config.json").get("prediction_type", "epsilon")
        settings = generate.GenerateSettings(
            method="ddim",
            num_steps=teacher_ddim,
            guidance=guidance or TEACHER_GUIDANCE,
            prediction_type=prediction_type,
        )
    else:
        if perflow is None:
            scheduler = _read_json(folder / "scheduler" / "scheduler_config.json").get("_class_name")
            raise SampleError(
                f"{model} is a Stable Diffusion folder whose scheduler is {scheduler}, not a PeRFlow student: "
                "sample it with --teacher-ddim STEPS, or give a training WORKDIR or a folder with a "
                f"{pipeline.PERFLOW_SCHEDULER}"
            )
        parameterization, num_windows = perflow
        settings = generate.GenerateSettings(
            method="perflow", num_steps=steps or DEFAULT_STEPS, guidance=guidance or STUDENT_GUIDANCE,
            parameterization=parameterization, num_windows=num_windows,
        )  # fmt: skip
    which = (weights or "ema") if workdir and teacher_ddim is None else None
    return Plan(
        model=model, folder=folder, which=which, step=step if which else None, settings=settings, height=height,
        width=width, latent_shape=(height // f, width // f, vae.config.latent_channels),
        negative_prompt=negative_prompt or "", dtype=dtype,
    )  # fmt: skip


def _model_facts(model: Path, workdir: bool, step: int | None) -> tuple[Path, tuple[str, int] | None, int, int | None]:
    """(pipeline folder, (parameterization, K) or None, training resolution, checkpoint step) from config files."""
    if workdir:
        step, config = checkpoint.run_config(model, step=step)
        folder = Path(config["model"]["path"])
        if not _is_model_folder(folder):
            raise SampleError(
                f"{model} was trained from {folder} (config.model.path), which holds no model now: "
                "put the teacher folder back there"
            )
        perflow = (config["perflow"]["parameterization"], int(config["perflow"]["num_windows"]))
        return folder, perflow, int(config["data"]["resolution"]), step
    if not _is_model_folder(model):
        raise SampleError(
            f"{model} is neither a training run's WORKDIR (checkpoints/) nor a model folder (vae/, unet/ and "
            "scheduler/ configs, converted or diffusers): give one of those"
        )
    perflow = pipeline.perflow_scheduler_settings(_read_json(model / "scheduler" / "scheduler_config.json"))
    # As pipeline.load_trained: the UNet's sample_size (in latents) times the VAE's factor.
    vae = models.from_config("AutoencoderKL", _read_json(model / "vae" / "config.json"))
    latent_size = _read_json(model / "unet" / "config.json").get("sample_size") or pipeline.DEFAULT_LATENT_SIZE
    return model, perflow, int(latent_size) * generate.vae_factor(vae), None


def _is_model_folder(folder: Path) -> bool:
    return all(
        (folder / name).is_file() for name in ("vae/config.json", "unet/config.json", "scheduler/scheduler_config.json")
    )


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def seed_noise(seed: int, count: int, shape: Sequence[int]) -> np.ndarray:
    """[count, h, w, c] float32: image j's noise is normal(fold_in(key(seed), j), shape), whatever ``count``."""
    key = jax.random.key(seed)
    draw = jax.vmap(lambda j: jax.random.normal(jax.random.fold_in(key, j), tuple(shape), jnp.float32))
    return np.asarray(jax.jit(draw)(jnp.arange(count)))


@dataclasses.dataclass
class Output:
    """One batch's results. images: [B, H, W, 3] float32 in [0, 1]. latents: [B, h, w, c] float32, the
    final latents before the VAE decode (times scaling_factor). compile_seconds: 0 when this batch size
    was compiled before. run_seconds: the compiled function's run, inputs on the devices."""

    images: np.ndarray
    latents: np.ndarray
    compile_seconds: float
    run_seconds: float


class Sampler:
    """A Plan's model on the devices and its jitted prompts-to-images function.

    Parameters are replicated on every device; the batch is split over all of them (padded to a
    multiple of the device count, the padding dropped from the results). One compilation per
    batch size; calling again with the same number of images reuses it.
    """

    def __init__(self, plan: Plan):
        self.plan = plan
        if plan.which is not None:
            model = pipeline.load_trained(plan.model, step=plan.step, which=plan.which).model
        else:
            model = pipeline.load_model(plan.folder)
        compute = DTYPES[plan.dtype]
        unet = model.module("unet", dtype=compute, attention_backend="auto")
        vae = model.module("vae", dtype=compute)
        text_names = [n for n in ("text_encoder", "text_encoder_2") if n in model.classes]
        encoders = {n: model.module(n, dtype=compute, attention_backend="auto") for n in text_names}
        networks = step.Networks(
            student=unet, teacher=unet, text_encoder=encoders["text_encoder"],
            text_encoder_2=encoders.get("text_encoder_2"), alphas_cumprod=model.alphas_cumprod(),
            scaling_factor=float(vae.config.scaling_factor), resolution=plan.height,
        )  # fmt: skip
        self.tokenize = model.tokenize
        self.mesh = sharding.make_mesh((-1, 1))
        replicated = sharding.replicated(self.mesh)
        self.params = _global(
            {
                "unet": cast_params(model.params["unet"], plan.dtype),
                "text": {n: cast_params(model.params[n], plan.dtype) for n in text_names},
                "vae": cast_params(model.params["vae"], plan.dtype),
            },
            replicated,
        )
        null_ids = dict(model.tokenize([plan.negative_prompt]))
        if model.sdxl:
            null_ids.update(
                original_size=np.full((1, 2), plan.height, np.int32), crop_top_left=np.zeros((1, 2), np.int32)
            )
        self.null_ids = _global(null_ids, replicated)
        generate_fn = generate.make_generate(networks, vae, plan.settings, latents=True)

        def prompts_to_images(unet_params, text_params, vae_params, ids, null_ids, noise):
            null_cond = step.encode_text(networks, text_params, null_ids)
            return generate_fn(unet_params, text_params, vae_params, ids, null_cond, noise)

        batch = sharding.batch_sharding(self.mesh)
        self._jitted = jax.jit(
            prompts_to_images,
            in_shardings=(replicated, replicated, replicated, batch, replicated, batch),
            out_shardings=(replicated, replicated),
        )
        self._compiled: dict[int, Any] = {}

    def __call__(self, prompts: Sequence[str], noise: np.ndarray) -> Output:
        """Images of ``prompts`` (one per image, B of them) from ``noise`` [B, h, w, c] (channels-last)."""
        noise = np.asarray(noise, np.float32)
        if noise.shape != (len(prompts), *self.plan.latent_shape):
            raise SampleError(
                f"noise of shape {noise.shape} for {len(prompts)} prompts: expected "
                f"{(len(prompts), *self.plan.latent_shape)} (images, h, w, c)"
            )
        count = len(prompts)
        padded = -(-count // self.mesh.size) * self.mesh.size
        ids = {k: _pad(v, padded, "edge") for k, v in self.tokenize(list(prompts)).items()}
        batch = sharding.batch_sharding(self.mesh)
        args = (
            self.params["unet"], self.params["text"], self.params["vae"], _global(ids, batch), self.null_ids,
            _global(_pad(noise, padded, "constant"), batch),
        )  # fmt: skip
        compile_seconds = 0.0
        if padded not in self._compiled:
            start = time.perf_counter()
            self._compiled[padded] = self._jitted.lower(*args).compile()
            compile_seconds = time.perf_counter() - start
        start = time.perf_counter()
        images, latents = jax.block_until_ready(self._compiled[padded](*args))
        run_seconds = time.perf_counter() - start
        return Output(np.asarray(images)[:count], np.asarray(latents)[:count], compile_seconds, run_seconds)


def _pad(x: np.ndarray, size: int, mode: str) -> np.ndarray:
    """``x`` [B, ...] padded along the batch to ``size`` rows (copies of the last, or zeros)."""
    return np.pad(x, [(0, size - x.shape[0])] + [(0, 0)] * (x.ndim - 1), mode=mode)


def _global(tree: Any, placement: jax.sharding.Sharding) -> Any:
    """Host arrays (the same on every process) as global arrays placed by ``placement``."""
    return jax.tree.map(lambda x: jax.make_array_from_callback(np.shape(x), placement, lambda index: x[index]), tree)


def to_nchw(x: np.ndarray) -> np.ndarray:
    """[B, h, w, c] -> [B, c, h, w] float32 (diffusers' layout)."""
    return np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2)), np.float32)


def to_nhwc(x: np.ndarray) -> np.ndarray:
    """[B, c, h, w] -> [B, h, w, c] float32 (this project's layout)."""
    return np.ascontiguousarray(np.transpose(x, (0, 2, 3, 1)), np.float32)


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line of a text file; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise SampleError(f"--prompts {path} does not exist: give a text file with one prompt per line")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise SampleError(f"--prompts {path} holds no prompts: write one prompt per line")
    return prompts


def sample(
    model: str | Path,
    prompts: Sequence[str],
    out: str | Path,
    *,
    steps: int | None = None,
    guidance: float | None = None,
    negative_prompt: str | None = None,
    seed: int = 0,
    num_images: int = 1,
    height: int | None = None,
    width: int | None = None,
    weights: str | None = None,
    step: int | None = None,
    teacher_ddim: int | None = None,
    init_noise: str | Path | None = None,
    save_noise: str | Path | None = None,
    save_latents: str | Path | None = None,
    singles: bool = False,
    dtype: str = "float32",
    log: Callable[[str], Any] = print,
) -> Output:
    """Sample ``num_images`` images of each prompt and write the grid PNG ``out`` (and the files asked for).

    Single images go beside ``out`` as ``<stem>_<j>.png`` (j as in the module docstring). The
    arguments are those of the command line; see the module docstring for the noise and the .npy files.
    """
    prompts, out = list(prompts), Path(out)
    if not prompts:
        raise SampleError("no prompts: give --prompt TEXT or --prompts FILE")
    if num_images < 1:
        raise SampleError(f"--num-images {num_images}: give at least 1 (images per prompt)")
    if out.suffix.lower() != ".png":
        raise SampleError(f"--out {out}: the grid is written as a PNG; give a path ending in .png")
    if init_noise is not None and not Path(init_noise).is_file():
        raise SampleError(f"--init-noise {init_noise} does not exist: give a .npy file (see --help for its layout)")
    plan = make_plan(
        model, steps=steps, guidance=guidance, teacher_ddim=teacher_ddim, negative_prompt=negative_prompt,
        weights=weights, step=step, height=height, width=width, dtype=dtype,
    )  # fmt: skip
    batch = [prompt for prompt in prompts for _ in range(num_images)]
    h, w, c = plan.latent_shape
    if init_noise is not None:
        given = np.load(init_noise)
        expected = (len(batch), c, h, w)
        if given.shape != expected or not np.issubdtype(given.dtype, np.floating):
            raise SampleError(
                f"--init-noise {init_noise} holds {given.dtype} {given.shape}; expected float32 {expected}: "
                f"{len(prompts)} prompts x {num_images} images, {c} latent channels, {h} x {w} latents for "
                f"{plan.height} x {plan.width} pixels, in diffusers' [images, c, h, w] layout"
            )
        noise = to_nhwc(given)
    else:
        noise = seed_noise(seed, len(batch), plan.latent_shape)

    start = time.perf_counter()
    sampler = Sampler(plan)
    source = f"the student of {plan.model} ({plan.which} weights)" if plan.which else str(plan.folder)
    log(f"loaded {source} in {time.perf_counter() - start:.1f} s")
    result = sampler(batch, noise)
    what = (
        f"the teacher's DDIM, {plan.settings.num_steps} steps"
        if plan.settings.method == "ddim"
        else f"PeRFlow, {plan.settings.num_steps} steps"
    )
    log(
        f"{what}, guidance {plan.settings.guidance}: compiled in {result.compile_seconds:.1f} s; {len(batch)} images "
        f"of {plan.height} x {plan.width} in {result.run_seconds:.3f} s ({1e3 * result.run_seconds / len(batch):.1f} "
        f"ms per image) on {sampler.mesh.size} {jax.devices()[0].platform} device(s)"
    )
    if jax.process_index() == 0:
        generate.save_png(generate.grid(result.images), out)
        written = [str(out)]
        if singles:
            for j, image in enumerate(result.images):
                generate.save_png(generate.grid(image[None], columns=1), out.with_name(f"{out.stem}_{j:03d}.png"))
            written.append(f"{len(batch)} single images {out.stem}_XXX.png")
        for path, array in ((save_noise, noise), (save_latents, result.latents)):
            if path is not None:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                np.save(path, to_nchw(array))
                written.append(str(path))
        log(f"wrote {', '.join(written)}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m perflow_jax.sample",
        description="Sample images from prompts with a PeRFlow student (or its teacher's DDIM) and write a grid PNG.",
        epilog=(
            "Noise files (--init-noise, --save-noise) and --save-latents are .npy float32 in diffusers' layout "
            "[images, c, h, w] (h, w = height, width / the VAE factor, 8 for SD), images ordered prompt by prompt: "
            "an --init-noise file can be given unchanged to a diffusers pipeline's latents= argument (with "
            "num_images_per_prompt=N). --save-noise writes the initial noise used; --save-latents the final latents "
            "before the VAE decode (scaled, as diffusers' output_type='latent'). Without --init-noise, image j's "
            "noise is jax.random.normal(jax.random.fold_in(jax.random.key(SEED), j), (h, w, c))."
        ),
    )
    parser.add_argument(
        "--model",
        type=Path,
        required=True,
        metavar="PATH",
        help="training WORKDIR, or a model folder (converted or diffusers) with a PeRFlowScheduler",
    )
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", metavar="TEXT", help="one prompt")
    prompt.add_argument(
        "--prompts", type=Path, metavar="FILE", help="text file, one prompt per line (blank lines skipped)"
    )
    parser.add_argument("--out", type=Path, required=True, metavar="PNG", help="the grid PNG to write")
    parser.add_argument(
        "--steps", type=int, help=f"student sampling steps, at least the window count (default {DEFAULT_STEPS})"
    )
    parser.add_argument(
        "--guidance",
        type=float,
        help=f"CFG scale >= 1 (default {STUDENT_GUIDANCE}; {TEACHER_GUIDANCE} with --teacher-ddim)",
    )
    parser.add_argument("--negative-prompt", help="the unconditional branch's prompt (default the empty prompt)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    parser.add_argument("--num-images", type=int, default=1, help="images per prompt (default 1)")
    parser.add_argument("--height", type=int, help="image height in pixels (default the training resolution)")
    parser.add_argument("--width", type=int, help="image width in pixels (default the training resolution)")
    parser.add_argument("--weights", choices=WEIGHTS, help="a WORKDIR's EMA (default) or raw student weights")
    parser.add_argument("--step", type=int, help="a WORKDIR's checkpoint step (default the newest)")
    parser.add_argument(
        "--teacher-ddim",
        type=int,
        metavar="STEPS",
        help="sample the teacher (a WORKDIR's, or a Stable Diffusion folder) with DDIM in STEPS steps",
    )
    parser.add_argument("--init-noise", type=Path, metavar="NPY", help="initial noise [images, c, h, w] to start from")
    parser.add_argument("--save-noise", type=Path, metavar="NPY", help="write the initial noise used [images, c, h, w]")
    parser.add_argument(
        "--save-latents",
        type=Path,
        metavar="NPY",
        help="write the final latents before the VAE decode [images, c, h, w]",
    )
    parser.add_argument("--singles", action="store_true", help="also write each image beside --out as STEM_XXX.png")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=COMPUTE_DTYPES,
        help="compute dtype (default float32; bfloat16 is faster on GPUs and TPUs)",
    )
    args = parser.parse_args(argv)
    try:
        sharding.initialize_distributed()
        prompts = read_prompts(args.prompts) if args.prompts is not None else [args.prompt]
        sample(
            args.model, prompts, args.out, steps=args.steps, guidance=args.guidance,
            negative_prompt=args.negative_prompt, seed=args.seed, num_images=args.num_images, height=args.height,
            width=args.width, weights=args.weights, step=args.step, teacher_ddim=args.teacher_ddim,
            init_noise=args.init_noise, save_noise=args.save_noise, save_latents=args.save_latents,
            singles=args.singles, dtype=args.dtype,
        )  # fmt: skip
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
