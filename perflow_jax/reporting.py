"""What a training run shows: console lines, metrics.jsonl rows, TensorBoard scalars, sample grids and FID.

Every process computes the same figures; process 0 writes them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from typing import Any

import jax
import numpy as np
import optax
from etils import epath

from perflow_jax import evaluate, fid, flops, image_io, paths, pipeline, recipe, sharding, step, weights


class Reporter:
    """Console lines, metrics.jsonl and TensorBoard scalars/images (process 0 only).

    A run resumed at ``first_step`` first drops what an interrupted run logged after its
    checkpoint (rows of metrics.jsonl, TensorBoard events), so that each step is logged once.
    ``workdir`` may be a URL (``gs://``): both files are then written through etils.epath.
    """

    def __init__(self, workdir: epath.Path, first_step: int = 0):
        self.active = jax.process_index() == 0
        if self.active:
            from tensorboardX import SummaryWriter, record_writer

            _drop_rows_after(workdir / "metrics.jsonl", first_step)
            self.jsonl = paths.open_append(workdir / "metrics.jsonl")
            if paths.is_url(workdir):  # tensorboardX's own gs:// writer needs google-cloud-storage
                record_writer.register_writer_factory(str(workdir).split("://")[0], _EventFiles())
            self.tensorboard = SummaryWriter(str(workdir / "tensorboard"), purge_step=first_step + 1)

    def scalars(self, step_number: int, values: dict[str, float], line: str) -> None:
        """Print ``line``, log ``values``: a non-finite one (an empty window's mean) as null, and not to TensorBoard."""
        if not self.active:
            return
        print(line, flush=True)
        row = {key: value if math.isfinite(value) else None for key, value in values.items()}
        self.jsonl.write(json.dumps({"step": step_number, **row}, allow_nan=False) + "\n")
        self.jsonl.flush()
        for key, value in row.items():
            if value is not None:
                self.tensorboard.add_scalar(key, value, step_number)
        self.tensorboard.flush()

    def image(self, step_number: int, name: str, image: np.ndarray) -> None:
        if self.active:
            self.tensorboard.add_image(name, image, step_number, dataformats="HWC")
            self.tensorboard.flush()

    def close(self) -> None:
        if self.active:
            self.jsonl.close()
            self.tensorboard.close()


EVENT_PART_BYTES = 8 * 2**20  # a gs:// event file's part: each flush rewrites the current part


class _EventFiles:
    """tensorboardX's writer factory for a URL: event files written through etils.epath (``paths.open_append``),
    in parts of up to about EVENT_PART_BYTES, each written whole at every flush."""

    def open(self, path: str):
        return paths.open_append(epath.Path(path), "ab", part_bytes=EVENT_PART_BYTES)

    def directory_check(self, path: str) -> None:
        epath.Path(path).mkdir(parents=True, exist_ok=True)


def _drop_rows_after(path: epath.Path, step_number: int) -> None:
    """Keep the rows of a metrics.jsonl up to ``step_number`` (and none that is cut off), replacing it whole."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step_number:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):  # a row cut off by a crash
            continue
    partial = path.with_name(path.name + ".writing")
    partial.write_text("".join(kept))
    partial.replace(path)


@dataclasses.dataclass
class Progress:
    """The figures of each report: the steps' metrics, samples/s, MFU and the ETA.

    Throughput counts the steps since the last report (or ``restart``, called once the step is
    compiled); the ETA, the mean rate since ``restart``. MFU needs ``flops_per_step`` and the
    device's peak in ``flops.PEAK_FLOPS``.
    """

    total: int
    global_batch_size: int
    learning_rate: optax.Schedule
    flops_per_step: float | None = None
    since: tuple[float, int] = (0.0, 0)  # (time, step) the throughput counts from
    start: tuple[float, int] = (0.0, 0)  # (time, step) the ETA counts from

    def restart(self, step_number: int) -> None:
        self.since = self.start = (time.perf_counter(), step_number)

    def report(self, pending: list[tuple[int, dict]], done: int) -> tuple[dict[str, float], str]:
        """The metrics.jsonl row and the console line of the ``pending`` (step, metrics), ``done`` the last step."""
        metrics = jax.device_get(pending[-1][1])
        sums = np.sum([jax.device_get(m["window_loss_sum"]) for _, m in pending], axis=0)
        counts = np.sum([jax.device_get(m["window_count"]) for _, m in pending], axis=0)
        per_window = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
        now = time.perf_counter()
        steps_per_s = (done - self.since[1]) / max(now - self.since[0], 1e-9)
        self.since = (now, done)
        samples_per_s = steps_per_s * self.global_batch_size
        peak = flops.PEAK_FLOPS.get(jax.devices()[0].device_kind)
        mfu = self.flops_per_step * steps_per_s / (peak * jax.device_count()) if peak and self.flops_per_step else None
        values = {
            "loss": float(np.mean([float(jax.device_get(m["loss"])) for _, m in pending])),
            "grad_norm": float(metrics["grad_norm"]),
            "lr": float(self.learning_rate(done - 1)),
            "samples_per_s": samples_per_s,
            **{f"loss_window_{k}": float(v) for k, v in enumerate(per_window)},
        }
        if mfu is not None:
            values["mfu"] = mfu
        eta = eta_seconds(self.start, now, done, self.total)
        windows = " ".join(f"{v:.4f}" for v in per_window)
        line = (
            f"step {done}/{self.total} | loss {values['loss']:.4f} | per window {windows} | grad norm "
            f"{values['grad_norm']:.3f} | lr {values['lr']:.2e} | {samples_per_s:.1f} samples/s"
            + (f" | MFU {100 * mfu:.1f}%" if mfu is not None else "")
            + f" | ETA {_duration(eta)}"
        )
        return values, line


def eta_seconds(start: tuple[float, int], now: float, done: int, total: int) -> float:
    """Seconds to step ``total`` at the mean rate since ``start`` = (time, step): steadier than the last interval's."""
    return (total - done) * (now - start[0]) / max(done - start[1], 1)


def _duration(seconds: float) -> str:
    """H:MM:SS, hours not wrapped at a day: 90061 -> '25:01:01'."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


class Samples:
    """Grids of the fixed prompts: the teacher's few-step DDIM at step 0, the EMA student every eval.

    Both through ``pipeline.Generator`` over the run's device parameters (frozen teacher and text
    encoders, the EMA student). Saved as WORKDIR/samples/teacher_ddim.png and step_XXXXXX.png, and
    to TensorBoard.
    """

    def __init__(
        self, config, workdir: epath.Path, components: step.Components, model: pipeline.Model, frozen, mesh, reporter
    ):
        self.folder = workdir / "samples"
        self.reporter = reporter
        vae = model.module("vae")
        params = {
            "unet": frozen["teacher"],
            "text": {n: frozen[n] for n in model.text_encoders},
            "vae": sharding.place(weights.cast_params(model.params["vae"], "float32"), sharding.replicated(mesh)),
        }
        common = {"num_steps": config.log.sample_steps, "guidance": config.log.sample_guidance}
        student = pipeline.GenerateSettings(
            method="perflow",
            parameterization=config.perflow.parameterization,
            num_windows=config.perflow.num_windows,
            **common,
        )
        teacher = pipeline.GenerateSettings(method="ddim", prediction_type=model.prediction_type(), **common)

        def generator(unet, settings):
            pipe = pipeline.Pipeline(unet, components.text, vae, components.alphas_cumprod)
            return pipeline.Generator(pipe, settings, params, model.tokenize, mesh)

        self.student_generator = generator(components.student, student)
        self._teacher = generator(components.teacher, teacher)
        self.prompts = list(config.log.sample_prompts)
        shape = self._teacher.pipe.latent_shape(config.data.resolution, config.data.resolution)
        self.noise = np.asarray(jax.random.normal(jax.random.key(config.log.sample_seed), (len(self.prompts), *shape)))

    def teacher(self) -> None:
        self._save("teacher_ddim", 0, self._teacher(self.prompts, self.noise).images)

    def student(self, step_number: int, ema_params: Any) -> None:
        images = self.student_generator(self.prompts, self.noise, unet_params=ema_params).images
        self._save(f"step_{step_number:06d}", step_number, images)

    def _save(self, name: str, step_number: int, images: np.ndarray) -> None:
        if jax.process_index() != 0:
            return
        picture = image_io.grid(images)
        image_io.save_png(picture, self.folder / f"{name}.png")
        self.reporter.image(step_number, "samples/teacher_ddim" if name == "teacher_ddim" else "samples/ema", picture)


class FIDEval:
    """Train-time FID (config.eval): the EMA student's config.eval.num_images images against config.eval.reference.

    The same prompts (config.eval.prompts, or the grid's in turn) and noise (log.sample_seed's,
    image j's as ``evaluate`` draws it) every time, so that the values compare across steps; drawn
    by ``generator``'s networks with config.eval.steps, eval.batch_size at a time, and measured as
    ``python -m perflow_jax.evaluate`` measures them. Logged as eval/fid.
    """

    def __init__(self, config, generator: pipeline.Generator, reporter: Reporter):
        e = config.eval
        self.reporter, self.total = reporter, config.train.num_steps
        self.batch_size, self.seed = e.batch_size, config.log.sample_seed
        self.reference_path = e.reference
        self.reference = fid.load_reference(e.reference, recipe.eval_spec(config))
        if e.features == "inception":
            self.features = evaluate.inception_features(e.inception, generator.mesh)
        else:
            self.features = evaluate.digit_features()
        steps = e.steps or config.log.sample_steps
        self.generator = generator.with_settings(dataclasses.replace(generator.settings, num_steps=steps))
        if e.prompts:
            self.prompts = evaluate.read_prompts(e.prompts, e.num_images, seed=0)
        else:
            grid = list(config.log.sample_prompts)
            self.prompts = [grid[j % len(grid)] for j in range(e.num_images)]
        self.latent_shape = generator.pipe.latent_shape(config.data.resolution, config.data.resolution)

    def __call__(self, step_number: int, ema_params: Any) -> float:
        """Draws, measures and logs the FID of ``ema_params`` at ``step_number``; returns it."""
        start = time.perf_counter()
        stats = fid.FeatureStats(self.features.dim)
        batches = evaluate.generated_batches(
            self.generator, self.prompts, self.seed, self.latent_shape, self.batch_size, 0, ema_params
        )
        for images, _, _ in batches:
            stats.add(self.features.compute(images))
        value = fid.frechet_distance(stats.mean, stats.sigma, self.reference.mu, self.reference.sigma)
        line = (
            f"step {step_number}/{self.total} | FID {value:.3f} vs {self.reference_path} ({stats.count} images, "
            f"{self.generator.settings.num_steps} steps) | {time.perf_counter() - start:.1f} s"
        )
        self.reporter.scalars(step_number, {"eval/fid": value}, line)
        return value
