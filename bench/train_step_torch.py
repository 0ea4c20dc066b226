"""The PyTorch part of the train-step benchmark: the authors' step (bench/torch_reference.py) and
its halves, eager and under torch.compile, timed stage by stage."""

from __future__ import annotations

import argparse
import platform
import time

import diffusers
import numpy as np
import torch
import transformers

from bench.common import Recorder, time_calls
from bench.torch_reference import ReferenceStep
from bench.train_step_spec import check_metrics, host_batch, null_batch, part_plan, spec_for
from perflow_jax.step import PeRFlowSettings


def run_torch(part: str, args: argparse.Namespace, rec: Recorder) -> None:
    """The part: eager step at each batch and its halves alone, then (SD1.5) the same under torch.compile."""
    spec = spec_for(part, args)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    rec.results.update(
        device_kind=torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
        platform=device.type,
        device_count=1,
        versions={
            "python": platform.python_version(),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "cudnn": torch.backends.cudnn.version() if cuda else None,
        },
        dtypes="student float32, autocast bfloat16; teacher and text encoders bfloat16" if cuda else "float32 (CPU)",
        gradient_checkpointing=spec.sdxl,
    )
    torch.backends.cudnn.benchmark = True
    if cuda and spec.sdxl:
        total = torch.cuda.get_device_properties(0).total_memory
        fraction = min(1.0, args.sdxl_memory_gb * 1e9 / total)
        torch.cuda.set_per_process_memory_fraction(fraction)
        rec.results["memory_fraction"] = fraction

    with rec.stage("init") as row:
        start = time.perf_counter()
        torch.manual_seed(0)
        with torch.device(device):  # parameters made and initialised on the card
            student = diffusers.UNet2DConditionModel(**spec.unet)
            configs = [transformers.CLIPTextConfig(**c) for c in spec.text_encoders]
            encoders = [transformers.CLIPTextModel(configs[0])]
            if spec.sdxl:
                encoders.append(transformers.CLIPTextModelWithProjection(configs[1]))
        ref = ReferenceStep(
            student,
            encoders[0],
            encoders[1] if spec.sdxl else None,
            spec.scheduler,
            PeRFlowSettings(**spec.settings),
            scaling_factor=spec.scaling_factor,
            resolution=8 * spec.latent_size,
            learning_rate=spec.learning_rate,
            weight_dtype=torch.bfloat16 if cuda else torch.float32,
            autocast_dtype=torch.bfloat16 if cuda else None,
            gradient_checkpointing=spec.sdxl,
        )
        synchronize()
        row["init_s"] = time.perf_counter() - start
        row["parameters"] = {"student": sum(p.numel() for p in student.parameters())}
        rec.log(
            f"init: networks on the device in {row['init_s']:.1f} s, student {row['parameters']['student'] / 1e6:.1f} M"
        )
    if not rec.ok("init"):
        return

    def to_device(host):
        out = {}
        for key, value in host.items():
            tensor = torch.from_numpy(np.ascontiguousarray(value.transpose(0, 3, 1, 2) if value.ndim == 4 else value))
            out[key] = tensor.to(device, dtype=torch.long if key.startswith("input_ids") else None)
        return out

    def measure(name, batch_size, kind):
        batch = to_device(host_batch(spec, batch_size, seed=batch_size))
        null = to_device(null_batch(spec, batch_size))
        metrics = []
        with rec.stage(f"run {name}", batch=batch_size, global_batch=batch_size) as row:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            if kind == "teacher":

                def call():
                    ref.teacher_part(batch, null)

            elif kind == "student":
                fixed = ref.teacher_part(batch, null)

                def call():
                    metrics.append(ref.student_update(fixed))

            else:

                def call():
                    metrics.append(ref(batch, null))

            if kind.startswith("compile"):
                start = time.perf_counter()
                call()
                synchronize()
                row["first_call_s"] = time.perf_counter() - start
                rec.log(f"{name}: first call (torch.compile compiles) {row['first_call_s']:.1f} s")
            row.update(time_calls(call, lambda _: synchronize(), args.iters, args.warmup))
            row["samples_per_s"] = batch_size / (row["median_ms"] / 1e3)
            if "first_call_s" in row:
                row["compile_s"] = row["first_call_s"] - row["median_ms"] / 1e3
            if cuda:
                row["memory"] = {
                    "peak_bytes_in_use": torch.cuda.max_memory_allocated(),
                    "peak_bytes_reserved": torch.cuda.max_memory_reserved(),
                }
            if metrics:
                host_metrics = [{k: v.detach().float().cpu().numpy() for k, v in m.items()} for m in metrics]
                summary, failures = check_metrics(host_metrics, batch_size)
                row.update(summary)
                rec.results["failures"].extend(f"{name}: {f}" for f in failures)
            peak = (row.get("memory") or {}).get("peak_bytes_in_use")
            rec.log(
                f"{name}: median {row['median_ms']:.1f} ms, {row['samples_per_s']:.1f} samples/s"
                + (f", peak {peak / 1e9:.1f} GB" if peak else "")
            )
        if cuda:
            torch.cuda.empty_cache()

    step_batches, alone_batch = part_plan(part, args)
    measure(f"step_b{step_batches[0]}", step_batches[0], "step")
    measure(f"teacher_b{alone_batch}", alone_batch, "teacher")
    measure(f"student_b{alone_batch}", alone_batch, "student")
    for batch_size in step_batches[1:]:
        measure(f"step_b{batch_size}", batch_size, "step")
    if args.compile_batch and not spec.sdxl:
        ref.compile()
        measure(f"compiled_step_b{args.compile_batch}", args.compile_batch, "compile_step")
        measure(f"compiled_teacher_b{args.compile_batch}", args.compile_batch, "teacher")
        measure(f"compiled_student_b{args.compile_batch}", args.compile_batch, "student")


def synchronize() -> None:
    """Wait for the GPU's queued work (nothing on the CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
