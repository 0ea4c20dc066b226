"""``python -m perflow_jax.train``: PeRFlow distillation of a Stable Diffusion model.

    python -m perflow_jax.train --config configs/sd15.py --workdir WORKDIR \\
        --config.model.path=CONVERTED_OR_DIFFUSERS_DIR --config.data.path=PREPARED_DATA_DIR

The same command runs on one CPU, one GPU, or every host of a TPU pod (``--config.tpu_pod``; on
GPU clusters set PERFLOW_COORDINATOR, PERFLOW_NUM_PROCESSES and PERFLOW_PROCESS_ID). A WORKDIR
that holds checkpoints resumes from the newest. SIGTERM (preemption) or Ctrl-C saves a
checkpoint after the current step and exits (a second Ctrl-C exits at once, without one). WORKDIR
gets checkpoints/, metrics.jsonl, TensorBoard events and samples/. Exit status 2: refused settings
or WORKDIR, or a non-finite loss or gradient (the last checkpoint is kept).
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from perflow_jax import checkpoint, data, flops, image_io, pipeline, recipe, sharding, step, weights

# Keys a resumed run may change: how long it runs, what it reports, and how the step is computed
# (attention backend, rematerialisation, gradient accumulation), which changes no result beyond
# rounding, so that a run can resume on a device with less memory. data.worker_count is not here:
# grain cannot restore its iterator with another number of workers.
RESUMABLE_KEYS = (
    "train.num_steps", "log.", "checkpoint.", "model.attention_backend", "model.remat",
    "train.gradient_accumulation_steps",
)  # fmt: skip


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss, or a WORKDIR of another run)."""


def check_resumable(saved: dict[str, Any], config: dict[str, Any]) -> None:
    """Refuse to resume a WORKDIR whose run differs in more than length and logging; list the keys.

    A relative folder in ``saved`` (a WORKDIR written before folders were saved absolute) is read
    from the current directory, as that run read it.
    """
    saved_flat, new_flat = _flatten(saved), _flatten(config)
    for key in recipe.PATH_KEYS:
        if saved_flat.get(key):
            saved_flat[key] = recipe.absolute_path(saved_flat[key])
    differing = sorted(
        key
        for key in set(saved_flat) | set(new_flat)
        if saved_flat.get(key) != new_flat.get(key) and not key.startswith(RESUMABLE_KEYS)
    )
    if differing:
        details = "; ".join(f"{k}: {saved_flat.get(k)!r} saved, {new_flat.get(k)!r} now" for k in differing)
        raise TrainingError(
            f"this WORKDIR holds a run with other settings ({details}): use another --workdir, or the saved settings"
        )


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return flat


class Stop:
    """Set by SIGTERM or Ctrl-C (a second Ctrl-C aborts at once); every process agrees on it.

    A context manager: the previous signal handlers are back when the loop ends.
    """

    def __init__(self, mesh):
        self.requested = False
        self._previous = {}
        self._mesh = mesh
        self._any = jax.jit(jnp.any, out_shardings=sharding.replicated(mesh))
        self._in_flight = None

    def __enter__(self) -> Stop:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(
            f"{signal.Signals(signum).name}: stopping after this step with a checkpoint"
            + (" (Ctrl-C again: stop at once, without one)" if signum == signal.SIGINT else ""),
            file=sys.stderr,
            flush=True,
        )

    def agreed(self) -> bool:
        """Whether to stop after the step just dispatched; every process gets the same answer at the same step.

        One process: at once. Several (called once per step by each): the processes' requests are
        combined on the devices behind this step and read back one step later, so the host never
        waits for the devices and a preempted pod still stops within about a step.
        """
        if jax.process_count() == 1:
            return self.requested
        local = np.full(jax.local_device_count(), self.requested)
        flags = jax.make_array_from_process_local_data(sharding.batch_sharding(self._mesh), local)
        previous, self._in_flight = self._in_flight, self._any(flags)
        return previous is not None and bool(np.asarray(previous.addressable_data(0)))


class Reporter:
    """Console lines, metrics.jsonl and TensorBoard scalars/images (process 0 only).

    A run resumed at ``first_step`` first drops what an interrupted run logged after its
    checkpoint (rows of metrics.jsonl, TensorBoard events), so that each step is logged once.
    """

    def __init__(self, workdir: Path, first_step: int = 0):
        self.active = jax.process_index() == 0
        if self.active:
            from tensorboardX import SummaryWriter

            _drop_rows_after(workdir / "metrics.jsonl", first_step)
            self.jsonl = open(workdir / "metrics.jsonl", "a")
            self.tensorboard = SummaryWriter(str(workdir / "tensorboard"), purge_step=first_step + 1)

    def scalars(self, step_number: int, values: dict[str, float], line: str) -> None:
        if not self.active:
            return
        print(line, flush=True)
        self.jsonl.write(json.dumps({"step": step_number, **values}) + "\n")
        self.jsonl.flush()
        for key, value in values.items():
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


def _drop_rows_after(path: Path, step_number: int) -> None:
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
    os.replace(partial, path)


class Samples:
    """Grids of the fixed prompts: the teacher's few-step DDIM at step 0, the EMA student every eval.

    Both through ``pipeline.Generator`` over the run's device parameters (frozen teacher and text
    encoders, the EMA student). Saved as WORKDIR/samples/teacher_ddim.png and step_XXXXXX.png, and
    to TensorBoard.
    """

    def __init__(
        self, config, workdir: Path, components: step.Components, model: pipeline.Model, frozen, mesh, reporter
    ):
        self.folder = workdir / "samples"
        self.reporter = reporter
        vae = model.module("vae")
        params = {
            "unet": frozen["teacher"],
            "text": {n: frozen[n] for n in ("text_encoder", "text_encoder_2") if n in frozen},
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

        self._student = generator(components.student, student)
        self._teacher = generator(components.teacher, teacher)
        self.prompts = list(config.log.sample_prompts)
        shape = self._teacher.pipe.latent_shape(config.data.resolution, config.data.resolution)
        self.noise = np.asarray(jax.random.normal(jax.random.key(config.log.sample_seed), (len(self.prompts), *shape)))

    def teacher(self) -> None:
        self._save("teacher_ddim", 0, self._teacher(self.prompts, self.noise).images)

    def student(self, step_number: int, ema_params: Any) -> None:
        images = self._student(self.prompts, self.noise, unet_params=ema_params).images
        self._save(f"step_{step_number:06d}", step_number, images)

    def _save(self, name: str, step_number: int, images: np.ndarray) -> None:
        if jax.process_index() != 0:
            return
        picture = image_io.grid(images)
        self.folder.mkdir(exist_ok=True)
        image_io.save_png(picture, self.folder / f"{name}.png")
        self.reporter.image(step_number, "samples/teacher_ddim" if name == "teacher_ddim" else "samples/ema", picture)


def _cross_attention_dim(unet_config: dict[str, Any]) -> int:
    width = unet_config.get("cross_attention_dim", 1280)
    return int(width[0] if isinstance(width, (list, tuple)) else width)


def _student_init(config: ml_collections.ConfigDict, model: pipeline.Model) -> Any:
    """The student's initial UNet parameters: the teacher's, or config.model.student_init's."""
    source = config.model.student_init
    if not source:
        return model.params["unet"]
    student = pipeline.load_model(source, networks=("unet",)).params["unet"]
    check_same_architecture(model.params["unet"], student, source)
    return student


def check_same_architecture(teacher: Any, student: Any, source: str) -> None:
    """Refuse a student_init whose UNet parameters differ from the teacher's in names or shapes."""
    shapes = [{jax.tree_util.keystr(p): np.shape(x) for p, x in jax.tree_util.tree_leaves_with_path(t)}
              for t in (teacher, student)]  # fmt: skip
    differing = sorted(k for k in shapes[0].keys() | shapes[1].keys() if shapes[0].get(k) != shapes[1].get(k))
    if differing:
        examples = "; ".join(f"{k}: {shapes[0].get(k)} in the teacher, {shapes[1].get(k)} here" for k in differing[:3])
        raise TrainingError(
            f"config.model.student_init {source} is not the teacher's architecture ({len(differing)} parameters "
            f"differ, e.g. {examples}): use a UNet of the same model family as config.model.path, or leave "
            "student_init empty to start from the teacher"
        )


def _refuse_another_run(workdir: Path, config: ml_collections.ConfigDict) -> None:
    """``check_resumable`` against the newest checkpoint, before anything is loaded; nothing for a new run."""
    if not checkpoint.is_workdir(workdir):
        return
    try:
        saved = checkpoint.run_config(workdir)[1]
    except checkpoint.CheckpointError:  # a folder without checkpoints yet
        return
    check_resumable(saved, config.to_dict())


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> step.TrainState:
    """Train (or resume training) per ``config`` in ``workdir``; returns the final state."""
    sharding.initialize_distributed(config.tpu_pod)
    recipe.validate(config)
    config = recipe.with_absolute_paths(config)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    _refuse_another_run(workdir, config)
    model = pipeline.load_model(config.model.path)
    manifest = data.read_manifest(config.data.path)
    text_names = [n for n in ("text_encoder", "text_encoder_2") if n in model.classes]
    recipe.validate_against(
        config,
        cross_attention_dim=_cross_attention_dim(model.configs["unet"]),
        text_widths=[model.configs[n]["hidden_size"] for n in text_names],
        sdxl=model.sdxl,
        manifest=manifest,
        device_count=jax.device_count(),
        teacher_prediction_type=model.prediction_type(),
    )
    mesh = sharding.make_mesh(config.mesh.shape)
    compute, frozen_dtype = weights.DTYPES[config.model.compute_dtype], weights.DTYPES[config.model.teacher_dtype]
    backend = config.model.attention_backend
    text = pipeline.TextEncoders(
        *(model.module(n, dtype=frozen_dtype, attention_backend=backend) for n in text_names),
        resolution=config.data.resolution,
        sdxl_time_ids=config.data.sdxl_time_ids,
    )
    components = step.Components(
        student=model.module("unet", dtype=compute, attention_backend=backend, remat=config.model.remat),
        teacher=model.module("unet", dtype=frozen_dtype, attention_backend=backend),
        text=text,
        alphas_cumprod=model.alphas_cumprod(),
        scaling_factor=float(manifest["scaling_factor"]),
        final_alpha_cumprod=model.final_alpha_cumprod(),
    )

    # Frozen parameters (teacher, text encoders) in the teacher dtype, sharded like the student.
    frozen = {"teacher": weights.cast_params(model.params["unet"], config.model.teacher_dtype)}
    frozen.update({n: weights.cast_params(model.params[n], config.model.teacher_dtype) for n in text_names})
    frozen_shardings = sharding.parameter_shardings(frozen, mesh)
    frozen = jax.device_put(frozen, frozen_shardings)
    null_ids = {k: jnp.asarray(v) for k, v in model.tokenize([""]).items()}
    if model.sdxl:
        null_ids.update(original_size=jnp.full((1, 2), config.data.resolution), crop_top_left=jnp.zeros((1, 2)))
    encode = jax.jit(text.encode, out_shardings=sharding.replicated(mesh))
    frozen["null_cond"] = encode(frozen, null_ids)
    frozen_shardings["null_cond"] = jax.tree.map(lambda _: sharding.replicated(mesh), frozen["null_cond"])

    optimizer = recipe.optimizer(config)
    learning_rate = recipe.learning_rate(config)
    init = functools.partial(step.create_train_state, optimizer=optimizer)
    student = _student_init(config, model)
    state_shardings = sharding.parameter_shardings(jax.eval_shape(init, student), mesh)
    state = jax.jit(init, out_shardings=state_shardings)(student)
    del student
    model.params = {"vae": model.params["vae"]}  # the rest is on the devices now; free the host copies

    batch_size = config.train.global_batch_size // jax.process_count()
    iterator = data.create_iterator(
        config.data.path, batch_size=batch_size, seed=config.data.seed, worker_count=config.data.worker_count
    )
    checkpoints = checkpoint.Checkpoints(workdir, keep=config.checkpoint.keep)
    first_step = 0
    latest = checkpoints.latest_step()
    if latest is not None:
        state, _ = checkpoints.restore(latest, checkpoint.abstract_like(state), iterator)
        first_step = latest
        print(f"resuming from the checkpoint of step {latest} in {workdir}")

    batch_shardings = sharding.batch_sharding(mesh)
    train_step = jax.jit(
        functools.partial(step.train_step, components=components, settings=recipe.settings(config),
                          optimizer=optimizer, accumulation_steps=config.train.gradient_accumulation_steps),
        in_shardings=(state_shardings, batch_shardings, sharding.replicated(mesh), frozen_shardings),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )  # fmt: skip
    return _loop(config, workdir, state, iterator, train_step, frozen, mesh, checkpoints, first_step,
                 learning_rate, components, model)  # fmt: skip


def _loop(config, workdir, state, iterator, train_step, frozen, mesh, checkpoints, first_step, learning_rate,
          components, model):  # fmt: skip
    """The training loop: steps, checks, reports, samples and checkpoints until done or stopped."""
    with Stop(mesh) as stop:
        return _steps(config, workdir, state, iterator, train_step, frozen, mesh, checkpoints, first_step,
                      learning_rate, components, model, stop)  # fmt: skip


def _steps(config, workdir, state, iterator, train_step, frozen, mesh, checkpoints, first_step, learning_rate,
           components, model, stop):  # fmt: skip
    reporter = Reporter(workdir, first_step)
    sampler = Samples(config, workdir, components, model, frozen, mesh, reporter)
    base_key = jax.random.key(config.train.seed)
    total = config.train.num_steps
    pending: list[tuple[int, dict]] = []  # (step, metrics) not yet brought to the host
    compiled, flops_per_step = None, None
    clock = (time.perf_counter(), first_step)
    try:
        if first_step == 0:
            sampler.teacher()
        for step_number in range(first_step, total):
            batch = data.global_batch(next(iterator), mesh)
            rng = jax.random.fold_in(base_key, step_number)
            if compiled is None:
                start = time.perf_counter()
                lowered = train_step.lower(state, batch, rng, frozen)
                compiled = lowered.compile()
                flops_per_step = flops.train_step_flops(
                    lowered, components, recipe.settings(config), state.params, frozen, batch,
                    config.train.gradient_accumulation_steps,
                )  # fmt: skip
                print(f"compiled the training step in {time.perf_counter() - start:.1f} s", flush=True)
                clock = (time.perf_counter(), step_number)
            state, metrics = compiled(state, batch, rng, frozen)
            pending.append((step_number + 1, metrics))
            done = step_number + 1
            # Several processes must stop at the same step, soon enough for a preempted pod's grace period.
            stopping = stop.agreed()
            if done % config.log.every_steps == 0 or done == total or stopping:
                clock = _report(reporter, pending, clock, done, total, learning_rate, flops_per_step, config)
                pending.clear()
            if done % config.checkpoint.every_steps == 0 or done == total or stopping:
                _check_finite(pending)
                pending.clear()
                checkpoints.save(done, state, iterator, config.to_dict())
            if done % config.log.eval_every_steps == 0 or done == total:
                sampler.student(done, state.ema_params)
            if stopping:
                print(f"stopped at step {done} on request; the checkpoint of step {done} resumes the run", flush=True)
                break
    finally:
        checkpoints.close()
        reporter.close()
    return state


def _check_finite(pending: list[tuple[int, dict]]) -> None:
    """Stop at the first step whose loss or gradient norm is not finite (its update would poison the state)."""
    for step_number, metrics in pending:
        for name in ("loss", "grad_norm"):
            value = float(jax.device_get(metrics[name]))
            if not np.isfinite(value):
                raise TrainingError(
                    f"the {name.replace('_', ' ')} became {value} at step {step_number}; the run stops and its last "
                    "checkpoint (before this step) is left as it was. Lower --config.optim.lr, check the data "
                    "(manifest.json) and the model"
                )


def _report(reporter, pending, clock, done, total, learning_rate, flops_per_step, config):
    """Check the pending steps, print a line and write scalars; returns the new (time, step) clock."""
    _check_finite(pending)
    metrics = jax.device_get(pending[-1][1])
    sums = np.sum([jax.device_get(m["window_loss_sum"]) for _, m in pending], axis=0)
    counts = np.sum([jax.device_get(m["window_count"]) for _, m in pending], axis=0)
    per_window = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    now = time.perf_counter()
    steps_per_s = (done - clock[1]) / max(now - clock[0], 1e-9)
    samples_per_s = steps_per_s * config.train.global_batch_size
    peak = flops.PEAK_FLOPS.get(jax.devices()[0].device_kind)
    mfu = flops_per_step * steps_per_s / (peak * jax.device_count()) if peak and flops_per_step else None
    values = {
        "loss": float(np.mean([float(jax.device_get(m["loss"])) for _, m in pending])),
        "grad_norm": float(metrics["grad_norm"]),
        "lr": float(learning_rate(done - 1)),
        "samples_per_s": samples_per_s,
        **{f"loss_window_{k}": float(v) for k, v in enumerate(per_window)},
    }
    if mfu is not None:
        values["mfu"] = mfu
    eta = (total - done) / max(steps_per_s, 1e-9)
    windows = " ".join(f"{v:.4f}" for v in per_window)
    line = (
        f"step {done}/{total} | loss {values['loss']:.4f} | per window {windows} | grad norm "
        f"{values['grad_norm']:.3f} | lr {values['lr']:.2e} | {samples_per_s:.1f} samples/s"
        + (f" | MFU {100 * mfu:.1f}%" if mfu is not None else "")
        + f" | ETA {_duration(eta)}"
    )
    reporter.scalars(done, values, line)
    return now, done


def _duration(seconds: float) -> str:
    """H:MM:SS, hours not wrapped at a day: 90061 -> '25:01:01'."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}: settings go in --config.KEY=VALUE")
    try:
        train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except (recipe.ConfigError, TrainingError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


_CONFIG = config_flags.DEFINE_config_file("config", None, "training config, e.g. configs/sd15.py", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "folder for checkpoints, metrics.jsonl, TensorBoard and samples")

if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
