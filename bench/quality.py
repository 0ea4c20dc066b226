"""The demo's quality table: is the 4-step PeRFlow student better than the teacher's own 4 steps?

For each way of sampling, ``--per-digit`` images of each prompt ("a handwritten digit zero" ...
"nine", image j asking for digit j mod 10) from the same initial noise (image j's from the seed):
- the teacher's DDIM at 1, 2, 4, 8 and 50 steps and the PeRFlow student (a training run's EMA
  weights) at 4 and 8 steps, each measured by ``python -m perflow_jax.evaluate --features digits``
  (its evaluations, resumable, and their grids go to ``quality/teacher`` and ``quality/student``
  beside ``--out``);
- with ``--lora-workdir``, a LoRA student (``model.lora_rank`` > 0) at 4 steps;
- the PyTorch export at 4 steps: diffusers' StableDiffusionPipeline with the exported UNet and
  ``perflow_jax.torch.PeRFlowScheduler`` (``python -m perflow_jax.export --to-torch --base ...``),
  its images measured by evaluate's functions.
Two measures with the digit classifier of ``perflow_jax.demo.classifier`` (trained on the
held-out real digits, which neither the teacher nor the student saw): its accuracy on the
generated images against the digit asked for, and the Frechet distance between its features of
the generated images and of the real training digits (evaluate's FID on the classifier's
penultimate layer; lower is closer to real digits).

    python bench/quality.py --teacher runs/demo/teacher --workdir runs/demo/work --export runs/demo/torch \
        --out runs/demo/quality.json

Writes the table to ``--out`` (JSON, with the command, date and versions) and prints a markdown table and the
verdict: whether PeRFlow at 4 steps beats the teacher's DDIM at 4 steps on both measures (a higher
accuracy and a lower Frechet distance), and how it compares with DDIM at 50 steps. Every row uses
the same classifier-free guidance (``--guidance``, default the run's ``log.sample_guidance``: 1,
no guidance, for configs/demo.py: the same number of UNet passes per step for every sampler).
"""

# The imports below must follow the sys.path line before them.
# ruff: noqa: E402
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from perflow_jax import checkpoint, console, fid, image_io, pipeline, sample
from perflow_jax import evaluate as ev
from perflow_jax.demo import classifier, digits

TEACHER_STEPS = (1, 2, 4, 8, 50)
STUDENT_STEPS = (4, 8)
EXPORT_STEPS = 4
REFERENCE = "digits:train"  # the real training digits, by prepare_data's source name
BATCH_SIZE = 100


def evaluate(model: Path, steps: tuple[int, ...], teacher: bool, out: Path, per_digit: int, seed: int, guidance: float):
    """``python -m perflow_jax.evaluate`` of ``model`` with the digit classifier against the real training
    digits: {row name: {"accuracy", "frechet_distance", "seconds_per_image"}} (resumed if run before)."""
    prompts = out.parent / "prompts.txt"
    prompts.parent.mkdir(parents=True, exist_ok=True)
    prompts.write_text("".join(digits.caption(label) + "\n" for label in range(10)))
    options = ev.Options(
        model=model,
        prompts=prompts,
        references=[REFERENCE],
        out=out,
        steps=steps,
        teacher_ddim=teacher,
        guidance=guidance,
        num_images=10 * per_digit,
        batch_size=BATCH_SIZE,
        seed=seed,
        features="digits",
    )
    try:
        metrics = ev.evaluate(options, log=lambda line: None)["samplers"]
    except ev.OtherSettings:  # another model checkpoint or settings: measure afresh
        metrics = ev.evaluate(dataclasses.replace(options, overwrite=True), log=lambda line: None)["samplers"]
    rows = {}
    for n in steps:
        entry = metrics[f"teacher_ddim_{n}" if teacher else f"perflow_{n}"]
        name = f"teacher DDIM {n} step{'s' if n > 1 else ''}" if teacher else f"PeRFlow {n} steps"
        rows[name] = {
            "accuracy": entry["classifier_accuracy"],
            "frechet_distance": entry["fid"][REFERENCE],
            "seconds_per_image": entry["seconds"] / entry["images"],
        }
    return rows


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


def torch_row(export: Path, out: Path, per_digit: int, seed: int, guidance: float) -> dict[str, float]:
    """The PyTorch export's images of the same prompts and noise, measured by evaluate's functions."""
    count = 10 * per_digit
    prompts = [digits.caption(j % 10) for j in range(count)]
    shape = sample.make_plan(sample.Options(export, prompts=prompts[:1])).latent_shape
    noise = pipeline.seed_noise(seed, count, shape)  # evaluate's: image j from the seed's noise j
    images, seconds = torch_images(export, prompts, noise, EXPORT_STEPS, guidance)
    pixels = image_io.to_uint8(images)
    stats = fid.FeatureStats(ev.digit_features().dim)
    stats.add(ev.digit_features().compute(pixels))
    spec = fid.FeatureSpec(ev.FEATURES["digits"], digits.RESOLUTION, ev.RESIZE)
    reference = fid.load_reference(out / "references" / "digits_train.npz", spec)
    image_io.save_png(image_io.grid(images[:64]), out / "torch_export_4.png")
    return {
        "accuracy": float(np.mean(ev.digit_agreement().score(pixels, prompts))),
        "frechet_distance": fid.frechet_distance(stats.mean, stats.sigma, reference.mu, reference.sigma),
        "seconds_per_image": seconds,
    }


def quality_table(
    teacher: Path,
    workdir: Path,
    export: Path | None,
    out: Path,
    *,
    per_digit: int = 50,
    seed: int = 0,
    guidance: float = 1.0,
    lora_workdir: Path | None = None,
) -> list[dict]:
    """The rows of the table (see the module docstring); evaluations and grids go to ``out.parent / "quality"``.

    ``guidance``: the classifier-free guidance of every row, teacher and student alike (1: none).
    """
    folder = out.parent / "quality"
    rows = evaluate(teacher, TEACHER_STEPS, True, folder / "teacher", per_digit, seed, guidance)
    rows.update(evaluate(workdir, STUDENT_STEPS, False, folder / "student", per_digit, seed, guidance))
    if lora_workdir is not None:
        lora_rows = evaluate(lora_workdir, (4,), False, folder / "lora", per_digit, seed, guidance)
        rows["PeRFlow-LoRA 4 steps"] = lora_rows["PeRFlow 4 steps"]
    if export is not None:
        rows[f"PeRFlow {EXPORT_STEPS} steps, PyTorch export"] = torch_row(
            export, folder / "teacher", per_digit, seed, guidance
        )
    for name, row in rows.items():
        print(f"{name}: accuracy {row['accuracy']:.3f}, Frechet distance {row['frechet_distance']:.2f}", flush=True)
    return [{"sampler": name, **row} for name, row in rows.items()]


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
    parser.add_argument("--lora-workdir", type=Path, help="a LoRA run's WORKDIR (model.lora_rank > 0): one row more")
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
                         guidance=args.guidance, lora_workdir=args.lora_workdir)  # fmt: skip
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
