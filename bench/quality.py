"""The demo's quality table: is the 4-step PeRFlow student better than the teacher's own 4 steps?

For each way of sampling, the same prompts ("a handwritten digit zero" ... "nine", ``--per-digit``
images each) from the same initial noise:
- the teacher's DDIM at 1, 2, 4, 8 and 50 steps (``python -m perflow_jax.sample --teacher-ddim``);
- the PeRFlow student (a training run's EMA weights) at 4 and 8 steps (``python -m perflow_jax.sample``);
- the PyTorch export at 4 steps: diffusers' StableDiffusionPipeline with the exported UNet and
  ``perflow_jax.torch.PeRFlowScheduler`` (``python -m perflow_jax.export --to-torch --base ...``).
Two measures with the digit classifier of ``perflow_jax.demo.classifier`` (trained on the
held-out real digits, which neither the teacher nor the student saw): its accuracy on the
generated images against the digit asked for, and the Frechet distance between its features of
the generated images and of the real training digits (FID's formula on the classifier's
penultimate layer; lower is closer to real digits).

    python bench/quality.py --teacher runs/demo/teacher --workdir runs/demo/work --export runs/demo/torch \
        --out runs/demo/quality.json

Writes the table to ``--out`` (JSON, with the command, date and versions) and one grid PNG per row
beside it (``quality/<row>.png``, a row of the grid per digit), and prints a markdown table and the
verdict: whether PeRFlow at 4 steps beats the teacher's DDIM at 4 steps on both measures (a higher
accuracy and a lower Frechet distance), and how it compares with DDIM at 50 steps. Every row uses
the same classifier-free guidance (``--guidance``, default the run's ``log.sample_guidance``: 1,
no guidance, for configs/demo.py: the same number of UNet passes per step for every sampler).
"""

# The imports below must follow the sys.path line before them.
# ruff: noqa: E402
from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from perflow_jax import checkpoint, console, image_io, pipeline, sample
from perflow_jax.demo import classifier, digits

TEACHER_STEPS = (1, 2, 4, 8, 50)
STUDENT_STEPS = (4, 8)
EXPORT_STEPS = 4


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[N, H, W, 3] floats in [0, 1] -> uint8, as a PNG would store them (what the classifier reads)."""
    return np.round(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)


def score(images: np.ndarray, labels: np.ndarray, real_features: np.ndarray) -> dict[str, float]:
    """Classifier accuracy against ``labels`` and Frechet distance to the real digits' features."""
    pixels = to_uint8(images)
    accuracy = float(np.mean(classifier.predict(pixels) == labels))
    distance = classifier.frechet_distance(classifier.features(pixels), real_features)
    return {"accuracy": accuracy, "frechet_distance": float(distance)}


def jax_images(options: sample.Options, noise: np.ndarray) -> tuple[np.ndarray, float]:
    """Images of this project's sampler, and seconds per image (compilation excluded)."""
    result = sample.load(options, sample.make_plan(options))(options.prompts, noise)
    return result.images, result.run_seconds / len(options.prompts)


def torch_images(export: Path, prompts: list[str], noise: np.ndarray, steps: int, guidance: float):
    """Images of diffusers' pipeline with the exported UNet and the PeRFlow scheduler, seconds per image."""
    import diffusers
    import torch

    import perflow_jax.torch  # noqa: F401  (diffusers finds PeRFlowScheduler among the imported modules)

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(export, torch_dtype=torch.float32, low_cpu_mem_usage=False)
    pipe.set_progress_bar_config(disable=True)
    start = time.perf_counter()
    with torch.no_grad():
        images = pipe(
            prompts, latents=torch.from_numpy(image_io.to_nchw(noise)), num_inference_steps=steps,
            guidance_scale=guidance, height=digits.RESOLUTION, width=digits.RESOLUTION, output_type="np",
        ).images  # fmt: skip
    return np.asarray(images, np.float32), (time.perf_counter() - start) / len(prompts)


def quality_table(
    teacher: Path,
    workdir: Path,
    export: Path | None,
    out: Path,
    *,
    per_digit: int = 50,
    seed: int = 0,
    guidance: float = 1.0,
) -> list[dict]:
    """The rows of the table (see the module docstring); grids go to ``out.parent / "quality"``.

    ``guidance``: the classifier-free guidance of every row, teacher and student alike (1: none).
    """
    labels = np.repeat(np.arange(10), per_digit)
    prompts = [digits.caption(int(label)) for label in labels]
    real_features = classifier.features(digits.load("train")[0])
    ways = [
        (f"teacher DDIM {n} step{'s' if n > 1 else ''}", "jax", dict(model=teacher, teacher_ddim=n, guidance=guidance))
        for n in TEACHER_STEPS
    ]
    ways += [(f"PeRFlow {n} steps", "jax", dict(model=workdir, steps=n, guidance=guidance)) for n in STUDENT_STEPS]
    if export is not None:
        ways.append((f"PeRFlow {EXPORT_STEPS} steps, PyTorch export", "torch", {}))
    noise, rows = None, []
    for name, framework, args in ways:
        if framework == "jax":
            options = sample.Options(prompts=prompts, **args)
            if noise is None:
                noise = pipeline.seed_noise(seed, len(prompts), sample.make_plan(options).latent_shape)
            images, seconds = jax_images(options, noise)
        else:
            images, seconds = torch_images(export, prompts, noise, EXPORT_STEPS, guidance)
        row = {"sampler": name, **score(images, labels, real_features), "seconds_per_image": seconds}
        rows.append(row)
        grid_path = out.parent / "quality" / (name.replace(" ", "_").replace(",", "") + ".png")
        shown = images.reshape(10, per_digit, *images.shape[1:])[:, : min(per_digit, 10)]  # a row per digit
        image_io.save_png(image_io.grid(shown.reshape(-1, *images.shape[1:]), columns=shown.shape[1]), grid_path)
        print(f"{name}: accuracy {row['accuracy']:.3f}, Frechet distance {row['frechet_distance']:.2f}", flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| sampler | classifier accuracy | Frechet distance to real digits |", "| --- | --- | --- |"]
    lines += [f"| {r['sampler']} | {r['accuracy']:.3f} | {r['frechet_distance']:.2f} |" for r in rows]
    return "\n".join(lines)


def verdict(rows: list[dict]) -> tuple[bool, str]:
    """Whether PeRFlow-4 beats DDIM-4 on both measures, and how it stands against DDIM-50, in words."""
    by_name = {r["sampler"]: r for r in rows}
    perflow, ddim4 = by_name["PeRFlow 4 steps"], by_name["teacher DDIM 4 steps"]
    ddim50 = by_name["teacher DDIM 50 steps"]
    beats = perflow["accuracy"] > ddim4["accuracy"] and perflow["frechet_distance"] < ddim4["frechet_distance"]
    text = (
        f"PeRFlow 4 steps {'beats' if beats else 'does NOT beat'} the teacher's DDIM 4 steps on both measures "
        f"(accuracy {perflow['accuracy']:.3f} vs {ddim4['accuracy']:.3f}, Frechet distance "
        f"{perflow['frechet_distance']:.2f} vs {ddim4['frechet_distance']:.2f}); the teacher's DDIM 50 steps: "
        f"accuracy {ddim50['accuracy']:.3f}, Frechet distance {ddim50['frechet_distance']:.2f}."
    )
    return beats, text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", type=Path, required=True, help="the teacher's converted or diffusers folder")
    parser.add_argument("--workdir", type=Path, required=True, help="the PeRFlow training run's WORKDIR")
    parser.add_argument("--export", type=Path, help="python -m perflow_jax.export --to-torch --base ... output")
    parser.add_argument("--out", type=Path, required=True, help="quality.json to write")
    parser.add_argument("--per-digit", type=int, default=50, help="images per digit and sampler")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial noise (the same for every sampler)")
    parser.add_argument(
        "--guidance", type=float, help="CFG of every row, teacher and student (default: the run's log.sample_guidance)"
    )
    parser.add_argument("--verbose", action="store_true", help=console.VERBOSE_HELP)
    args = parser.parse_args(argv)
    console.set_log_levels(args.verbose)
    if args.guidance is None:
        args.guidance = float(checkpoint.run_config(args.workdir)[1]["log"]["sample_guidance"])
    rows = quality_table(args.teacher, args.workdir, args.export, args.out, per_digit=args.per_digit, seed=args.seed,
                         guidance=args.guidance)  # fmt: skip
    beats, text = verdict(rows)
    import jax

    report = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {jax.devices()[0].device_kind}",
        "jax": jax.__version__,
        "per_digit": args.per_digit,
        "seed": args.seed,
        "guidance": args.guidance,
        "classifier_accuracy_on_real_train_digits": float(
            np.mean(classifier.predict(digits.load("train")[0]) == digits.load("train")[1])
        ),
        "rows": rows,
        "perflow_4_beats_ddim_4": beats,
        "verdict": text,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(markdown(rows))
    print()
    print(text)
    print(f"(classifier accuracy on the real training digits: {report['classifier_accuracy_on_real_train_digits']:.3f};"
          f" written to {args.out})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
