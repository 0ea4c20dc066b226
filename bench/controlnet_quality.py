"""Does a ControlNet still steer the 4-step PeRFlow student? The demo ControlNet's control-following table.

    python bench/controlnet_quality.py --out runs/demo/controlnet_quality.json [--count 200] [--seed 0] \
        [--via diffusers --via jax]

The control images are the silhouettes (``perflow_jax.demo.control``) of the first ``--count``
held-out digits, the prompt each digit's caption, and every row starts image j from the same
initial noise (torch's generator of ``--seed``). Rows, all at guidance 1 (no CFG, as the demo's
quality table) and control scale 1:
- the teacher's DDIM at 50 steps with the ControlNet's scale at 0 (how often a silhouette is hit by chance;
  diffusers only);
- the teacher's DDIM at 50 and at 4 steps with the ControlNet ("trailing" spacing);
- the PeRFlow student (the teacher plus ``perflow_jax.demo.DELTA``, diff_eps, 4 windows) at 4 steps with the
  same ControlNet.
``--via diffusers``: StableDiffusionControlNetPipeline with DDIMScheduler and ``perflow_jax.torch.PeRFlowScheduler``;
``--via jax``: this project's Generator, the teacher converted with ``--controlnet`` (and the student with
``--perflow-delta``, the same ControlNet) into a temporary folder; both by default, on the CPU in float32.
Measures: the mean silhouette IoU with the control (``control.silhouette_iou``), the digit
classifier's accuracy against the prompt (``perflow_jax.demo.classifier``), seconds per image (JAX: the
compiled run, compilation apart). With both, each JAX row also gives its largest pixel difference from the
diffusers row's samples (uint8). Writes ``--out`` (JSON with the command, date and machine), a grid of the
first 20 controls and samples per row beside it, and prints a markdown table.
"""

# The imports below must follow the sys.path line before them.
# ruff: noqa: E402
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import numpy as np
import torch

from bench.common import now
from perflow_jax import image_io, pipeline
from perflow_jax.demo import CONTROLNET, DELTA, TEACHER, classifier, control, digits

GRID_IMAGES = 20


def control_set(count: int) -> tuple[list[str], np.ndarray]:
    """(prompts, control images [count, 32, 32, 3] uint8) of the first ``count`` held-out digits."""
    images, labels = digits.load("heldout")
    if not 1 <= count <= len(labels):
        raise ValueError(f"--count {count}: give 1 to {len(labels)} (the held-out digits)")
    return [digits.caption(label) for label in labels[:count]], control.control_images(images[:count])


def measure(samples: np.ndarray, prompts: list[str], controls: np.ndarray) -> dict[str, float]:
    """{"silhouette_iou", "accuracy"} of samples [N, 32, 32, 3] uint8 against their controls and prompts."""
    asked = np.asarray([digits.DIGIT_NAMES.index(p.rsplit(" ", 1)[-1]) for p in prompts])
    return {
        "silhouette_iou": float(control.silhouette_iou(samples, controls).mean()),
        "accuracy": float(np.mean(classifier.predict(samples) == asked)),
    }


def diffusers_rows(controlnet: Path, count: int, seed: int) -> tuple[dict[str, dict], dict[str, np.ndarray]]:
    """({row name: measures}, {row name: samples [count, 32, 32, 3] uint8}) of the rows in the module docstring."""
    import diffusers

    from perflow_jax.torch import PeRFlowScheduler, merge_delta_weights

    prompts, controls = control_set(count)
    pipe = diffusers.StableDiffusionControlNetPipeline.from_pretrained(
        TEACHER, controlnet=diffusers.ControlNetModel.from_pretrained(controlnet), dtype=torch.float32
    )
    pipe.set_progress_bar_config(disable=True)
    teacher_config = dict(pipe.scheduler.config)
    ddim = diffusers.DDIMScheduler.from_config(teacher_config, timestep_spacing="trailing")
    perflow = PeRFlowScheduler.from_config(pipeline.perflow_scheduler_config(teacher_config, "diff_eps", 4))
    noise = torch.randn(
        (count, 4, digits.RESOLUTION // 4, digits.RESOLUTION // 4), generator=torch.Generator().manual_seed(seed)
    )
    rows = [  # (name, the PeRFlow student?, steps, ControlNet scale); the student's rows last
        ("teacher DDIM 50 steps, control scale 0", False, 50, 0.0),
        ("teacher DDIM 50 steps + ControlNet", False, 50, 1.0),
        ("teacher DDIM 4 steps + ControlNet", False, 4, 1.0),
        ("PeRFlow 4 steps + ControlNet", True, 4, 1.0),
    ]
    results, samples = {}, {"controls": controls}
    for name, student, steps, scale in rows:
        if student and pipe.scheduler is not perflow:
            merge_delta_weights(pipe.unet, DELTA)  # the teacher's UNet becomes the student
        pipe.scheduler = perflow if student else ddim
        start = time.perf_counter()
        with torch.no_grad():
            images = pipe(
                prompts,
                image=torch.from_numpy(controls).permute(0, 3, 1, 2).float() / 255.0,
                num_inference_steps=steps,
                guidance_scale=1.0,
                controlnet_conditioning_scale=scale,
                latents=noise.clone(),
                output_type="np",
            ).images
        seconds = (time.perf_counter() - start) / count
        samples[name] = image_io.to_uint8(np.asarray(images, np.float32))
        results[name] = {**measure(samples[name], prompts, controls), "seconds_per_image": seconds}
        print(f"{name}: {results[name]}", flush=True)
    return results, samples


def jax_rows(controlnet: Path, count: int, seed: int) -> tuple[dict[str, dict], dict[str, np.ndarray]]:
    """The rows of ``diffusers_rows`` with the ControlNet (not the scale-0 one), sampled by this project's
    Generator on the same controls and noise, each row's images in one jitted call."""
    from perflow_jax.convert import convert

    prompts, controls = control_set(count)
    noise = torch.randn(
        (count, 4, digits.RESOLUTION // 4, digits.RESOLUTION // 4), generator=torch.Generator().manual_seed(seed)
    )
    noise = image_io.to_nhwc(noise.numpy())
    teacher_scheduler = pipeline.read_json(TEACHER / "scheduler" / "scheduler_config.json")
    ddim = pipeline.GenerateSettings(
        method="ddim",
        guidance=1.0,
        prediction_type=teacher_scheduler.get("prediction_type", "epsilon"),
        control_scales=(1.0,),
    )
    perflow = pipeline.GenerateSettings(
        num_steps=4, guidance=1.0, parameterization="diff_eps", num_windows=4, control_scales=(1.0,)
    )
    rows = [  # (name, the PeRFlow student?, settings)
        ("teacher DDIM 50 steps + ControlNet", False, dataclasses.replace(ddim, num_steps=50)),
        ("teacher DDIM 4 steps + ControlNet", False, dataclasses.replace(ddim, num_steps=4)),
        ("PeRFlow 4 steps + ControlNet", True, perflow),
    ]
    results, samples = {}, {"controls": controls}
    with tempfile.TemporaryDirectory() as tmp:
        folders = {False: Path(tmp) / "teacher", True: Path(tmp) / "student"}
        quiet = lambda message: None  # noqa: E731
        convert(TEACHER, folders[False], controlnet=[f"{controlnet}:digits"], log=quiet)
        convert(TEACHER, folders[True], perflow_delta=DELTA, controlnet=[f"{controlnet}:digits"], log=quiet)
        for name, student, settings in rows:
            generator = pipeline.load_generator(
                pipeline.describe(folders[student]), settings, height=digits.RESOLUTION, controlnets=["digits"]
            )
            output = generator(prompts, noise, control=(controls.astype(np.float32) / 255.0,))
            samples[name] = image_io.to_uint8(output.images)
            results[name] = {
                **measure(samples[name], prompts, controls),
                "seconds_per_image": output.run_seconds / count,
                "compile_seconds": output.compile_seconds,
            }
            print(f"JAX {name}: {results[name]}", flush=True)
    return results, samples


def markdown(rows: dict[str, dict[str, dict]]) -> str:
    """The table of ``rows`` ({via: {row name: measures}}), each sampler's rows side by side."""
    lines = ["| sampler | via | silhouette IoU with the control | classifier accuracy |", "| --- | --- | --- | --- |"]
    names = list(dict.fromkeys(name for by_name in rows.values() for name in by_name))
    for name in names:
        lines += [
            f"| {name} | {via} | {r[name]['silhouette_iou']:.3f} | {r[name]['accuracy']:.3f} |"
            for via, r in rows.items()
            if name in r
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    parser.add_argument("--controlnet", type=Path, default=CONTROLNET, help="a diffusers ControlNetModel folder")
    parser.add_argument("--count", type=int, default=200, help="control images (held-out digits)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial noise (the same for every row)")
    parser.add_argument(
        "--via", action="append", choices=["diffusers", "jax"], help="the samplers' implementation (default both)"
    )
    args = parser.parse_args(argv)
    vias = list(dict.fromkeys(args.via or ["diffusers", "jax"]))
    torch.set_num_threads(1)
    rows, samples = {}, {}
    for via in vias:
        rows[via], by_name = (diffusers_rows if via == "diffusers" else jax_rows)(
            args.controlnet, args.count, args.seed
        )
        samples.update({name if name == "controls" else f"{name} ({via})": images for name, images in by_name.items()})
    if len(vias) == 2:
        for name, row in rows["jax"].items():
            difference = np.abs(samples[f"{name} (jax)"].astype(int) - samples[f"{name} (diffusers)"].astype(int))
            row["max_pixel_difference_from_diffusers"] = int(difference.max())
            print(f"{name}: JAX vs diffusers, largest pixel difference {difference.max()} of 255", flush=True)
    report = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "date": now(),
        "machine": f"{platform.processor() or platform.machine()}, CPU, torch {torch.__version__}, jax "
        f"{jax.__version__}",
        "via": {
            "diffusers": "diffusers StableDiffusionControlNetPipeline, float32",
            "jax": "perflow_jax.pipeline.Generator, float32",
        },
        "count": args.count,
        "seed": args.seed,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    grid = np.concatenate([images[:GRID_IMAGES] for images in samples.values()])
    image_io.save_png(image_io.grid(grid.astype(np.float32) / 255.0, columns=GRID_IMAGES), args.out.with_suffix(".png"))
    print()
    print(markdown(rows))
    print(f"(written to {args.out} and the grid {args.out.with_suffix('.png')}: controls, then one row per sampler)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
