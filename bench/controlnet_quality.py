"""Does a ControlNet still steer the 4-step PeRFlow student? The demo ControlNet's control-following table.

    python bench/controlnet_quality.py --out runs/demo/controlnet_quality.json [--count 200] [--seed 0]

The control images are the silhouettes (``perflow_jax.demo.control``) of the first ``--count``
held-out digits, the prompt each digit's caption, and every row starts image j from the same
initial noise (torch's generator of ``--seed``). Rows, all at guidance 1 (no CFG, as the demo's
quality table) and control scale 1:
- the teacher's DDIM at 50 steps with the ControlNet's scale at 0 (how often a silhouette is hit by chance);
- the teacher's DDIM at 50 and at 4 steps with the ControlNet (diffusers' DDIMScheduler, "trailing"
  spacing, as this project's DDIM);
- the PeRFlow student (the teacher plus ``perflow_jax.demo.DELTA``) at 4 steps with the same ControlNet
  and ``perflow_jax.torch.PeRFlowScheduler`` (diff_eps, 4 windows).
Measures: the mean silhouette IoU with the control (``control.silhouette_iou``), the digit
classifier's accuracy against the prompt (``perflow_jax.demo.classifier``), seconds per image.
The rows are sampled with diffusers' ``StableDiffusionControlNetPipeline`` on the CPU in float32;
``control_set`` and ``measure`` are what a JAX path would reuse. Writes ``--out`` (JSON with the
command, date and machine), a grid of the first 20 controls and samples per row beside it, and
prints a markdown table.
"""

# The imports below must follow the sys.path line before them.
# ruff: noqa: E402
from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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


def markdown(rows: dict[str, dict]) -> str:
    lines = ["| sampler | silhouette IoU with the control | classifier accuracy |", "| --- | --- | --- |"]
    lines += [f"| {name} | {r['silhouette_iou']:.3f} | {r['accuracy']:.3f} |" for name, r in rows.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    parser.add_argument("--controlnet", type=Path, default=CONTROLNET, help="a diffusers ControlNetModel folder")
    parser.add_argument("--count", type=int, default=200, help="control images (held-out digits)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial noise (the same for every row)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows, samples = diffusers_rows(args.controlnet, args.count, args.seed)
    report = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "date": now(),
        "machine": f"{platform.processor() or platform.machine()}, CPU, torch {torch.__version__}",
        "via": "diffusers StableDiffusionControlNetPipeline, float32",
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
