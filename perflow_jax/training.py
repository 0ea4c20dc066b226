"""PeRFlow distillation: ``train_and_evaluate(config, workdir)``, the library behind ``python -m perflow_jax.train``.

The setup checks the config, loads the model, places the frozen parameters and the student's
state on the devices, opens the data and the checkpoints (resuming from the newest) and jits the
step; then one loop steps, reports, checkpoints, samples and (config.eval.fid_every) measures FID
until ``config.train.num_steps``, a stop request (``Stop``, then ``Stopped`` is raised), a failed
save or a non-finite loss or gradient. With ``config.model.lora_rank`` > 0 the student is LoRA
adapters on the frozen teacher (``lora``).
Process 0 holds WORKDIR's lock (``checkpoint.WorkdirLock``) from the start to the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import signal
import sys
import time
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import optax
from etils import epath
from jax.experimental import multihost_utils

from perflow_jax import (
    checkpoint,
    compile_cache,
    data,
    flops,
    lora,
    pipeline,
    recipe,
    reporting,
    sharding,
    step,
    weights,
)


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss, a student_init of another architecture, a WORKDIR that is a file)."""


class Stopped(Exception):
    """SIGTERM or Ctrl-C stopped the run before its last step, after a checkpoint; resume by running it again.

    ``exit_code``: the shell's status of that signal, 143 (SIGTERM, e.g. a preemption) or 130 (Ctrl-C).
    """

    def __init__(self, step: int, signum: int):
        super().__init__(f"stopped at step {step} by {signal.Signals(signum).name}")
        self.exit_code = 128 + signum


@dataclasses.dataclass
class Run:
    """What the loop reads, built once by the setup of ``train_and_evaluate``."""

    config: ml_collections.ConfigDict
    workdir: epath.Path
    mesh: jax.sharding.Mesh
    model: pipeline.Model  # its VAE and tokenizers draw the sample grids
    components: step.Components
    settings: step.PeRFlowSettings
    learning_rate: optax.Schedule
    frozen: dict[str, Any]  # teacher, text encoders and null_cond, on the devices
    train_step: Any  # the jitted step.train_step, lowered and compiled on the first batch
    iterator: grain.DataLoaderIterator
    checkpoints: checkpoint.Checkpoints
    first_step: int  # 0, or the step of the checkpoint resumed from


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> step.TrainState:
    """Train (or resume training) per ``config`` in ``workdir`` (a folder or a ``gs://`` URL); returns the final
    state, or raises ``Stopped``."""
    sharding.initialize_distributed(config.tpu_pod)
    recipe.validate(config)
    config = recipe.with_absolute_paths(config)
    workdir = epath.Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise TrainingError(f"--workdir {workdir} is a file, not a folder: give a new folder or a training run's")
    workdir.mkdir(parents=True, exist_ok=True)
    with (
        checkpoint.WorkdirLock(workdir) if jax.process_index() == 0 else contextlib.nullcontext(),
        compile_cache.cache_in(compile_cache.training_folder(config.compilation_cache_dir, workdir)),
    ):
        return _train(config, workdir)


def _train(config: ml_collections.ConfigDict, workdir: epath.Path) -> step.TrainState:
    """The setup, then ``_loop``."""
    _refuse_another_run(workdir, config)
    model = pipeline.load_model(config.model.path)
    manifest = data.read_manifest(config.data.path)
    fingerprint = data.model_fingerprint(model.configs["vae"], model.params["vae"], config.model.path)
    data.check_for_training(config.data.path, manifest, fingerprint, config.data.allow_other_vae)
    _validate_against_model(config, model, manifest)

    mesh = sharding.make_mesh(config.mesh.shape)
    components = _components(config, model, manifest)
    frozen, frozen_shardings = _frozen_params(config, model, components, mesh)
    settings, optimizer = recipe.settings(config), recipe.optimizer(config)
    learning_rate = recipe.learning_rate(config)  # the optimizer's, for the reports
    state, state_shardings = _initial_state(config, model, optimizer, mesh, components.lora)
    model.params = {"vae": model.params["vae"]}  # the rest is on the devices now; free the host copies

    iterator = data.create_iterator(
        config.data.path,
        batch_size=config.train.global_batch_size // jax.process_count(),
        seed=config.data.seed,
        worker_count=config.data.worker_count,
    )
    checkpoints = checkpoint.Checkpoints(workdir, keep=config.checkpoint.keep)
    first_step = 0
    restored = checkpoints.restore_newest(checkpoint.abstract_like(state), iterator)
    if restored is not None:
        first_step, state = restored
        print(f"resuming from the checkpoint of step {first_step} in {workdir}")

    replicated = sharding.replicated(mesh)
    train_step = jax.jit(
        functools.partial(
            step.train_step,
            components=components,
            settings=settings,
            optimizer=optimizer,
            accumulation_steps=config.train.gradient_accumulation_steps,
        ),
        in_shardings=(state_shardings, sharding.batch_sharding(mesh), replicated, frozen_shardings),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
    )
    run = Run(
        config=config,
        workdir=workdir,
        mesh=mesh,
        model=model,
        components=components,
        settings=settings,
        learning_rate=learning_rate,
        frozen=frozen,
        train_step=train_step,
        iterator=iterator,
        checkpoints=checkpoints,
        first_step=first_step,
    )
    return _loop(run, state)


def _refuse_another_run(workdir: epath.Path, config: ml_collections.ConfigDict) -> None:
    """``recipe.check_resumable`` against the newest checkpoint, before anything is loaded; nothing for a new run."""
    if not checkpoint.is_workdir(workdir):
        return
    try:
        saved = checkpoint.run_config(workdir)[1]
    except checkpoint.CheckpointError:  # a folder without checkpoints yet
        return
    recipe.check_resumable(saved, config.to_dict())


def _validate_against_model(config: ml_collections.ConfigDict, model: pipeline.Model, manifest: dict) -> None:
    """``recipe.validate_against`` the loaded model, the prepared data's manifest and the devices."""
    recipe.validate_against(
        config,
        cross_attention_dim=_cross_attention_dim(model.configs["unet"]),
        text_widths=[model.configs[n]["hidden_size"] for n in model.text_encoders],
        sdxl=model.sdxl,
        manifest=manifest,
        device_count=jax.device_count(),
        teacher_prediction_type=model.prediction_type(),
    )


def _cross_attention_dim(unet_config: dict[str, Any]) -> int:
    width = unet_config.get("cross_attention_dim", 1280)
    return int(width[0] if isinstance(width, (list, tuple)) else width)


def _components(config: ml_collections.ConfigDict, model: pipeline.Model, manifest: dict) -> step.Components:
    """The student in the compute dtype; the teacher and text encoders in the teacher dtype."""
    compute, frozen_dtype = weights.DTYPES[config.model.compute_dtype], weights.DTYPES[config.model.teacher_dtype]
    backend = config.model.attention_backend
    text = pipeline.TextEncoders(
        *(model.module(n, dtype=frozen_dtype, attention_backend=backend) for n in model.text_encoders),
        resolution=config.data.resolution,
        sdxl_time_ids=config.data.sdxl_time_ids,
    )
    adapters = lora.spec(config.model)
    if adapters is not None:
        unmatched = lora.unmatched_targets(model.params["unet"], adapters.targets)
        if unmatched:
            raise recipe.ConfigError(
                [f"config.model.lora_targets {', '.join(unmatched)} name no module of the UNet: check their spelling"]
            )
    return step.Components(
        student=model.module("unet", dtype=compute, attention_backend=backend, remat=config.model.remat),
        teacher=model.module("unet", dtype=frozen_dtype, attention_backend=backend),
        text=text,
        alphas_cumprod=model.alphas_cumprod(),
        scaling_factor=float(manifest["scaling_factor"]),
        final_alpha_cumprod=model.final_alpha_cumprod(),
        lora=adapters,
    )


def _frozen_params(
    config: ml_collections.ConfigDict, model: pipeline.Model, components: step.Components, mesh: jax.sharding.Mesh
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(frozen parameters on the devices, their shardings): the teacher and text encoders in the teacher dtype,
    sharded like the student, and ``null_cond``, the empty prompt's condition, replicated."""
    frozen = {"teacher": weights.cast_params(model.params["unet"], config.model.teacher_dtype)}
    frozen.update({n: weights.cast_params(model.params[n], config.model.teacher_dtype) for n in model.text_encoders})
    frozen_shardings = sharding.parameter_shardings(frozen, mesh)
    frozen = jax.device_put(frozen, frozen_shardings)
    null_ids = {**components.text.size_ids(1), **model.tokenize([""])}
    encode = jax.jit(components.text.encode, out_shardings=sharding.replicated(mesh))
    frozen["null_cond"] = encode(frozen, null_ids)
    frozen_shardings["null_cond"] = jax.tree.map(lambda _: sharding.replicated(mesh), frozen["null_cond"])
    return frozen, frozen_shardings


def _initial_state(
    config: ml_collections.ConfigDict,
    model: pipeline.Model,
    optimizer: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
    adapters: lora.LoraSpec | None = None,
) -> tuple[step.TrainState, Any]:
    """(the student's TrainState on the devices, its shardings), from the teacher or config.model.student_init;
    a LoRA student's: new ``adapters`` (A drawn from a key of config.train.seed that no step uses), no EMA."""
    if adapters is not None:
        unet = jax.eval_shape(lambda: model.params["unet"])
        key = jax.random.fold_in(jax.random.key(config.train.seed), np.iinfo(np.int32).max)

        def init(key):
            return step.create_train_state(lora.init_adapters(key, unet, adapters), optimizer, ema=False)

        state_shardings = sharding.parameter_shardings(jax.eval_shape(init, key), mesh)
        state = jax.jit(init, out_shardings=state_shardings)(key)
        print(f"LoRA student: rank {adapters.rank}, {lora.count(state.params):,} trainable parameters, no EMA")
        return state, state_shardings
    init = functools.partial(step.create_train_state, optimizer=optimizer)
    student = _student_init(config, model)
    state_shardings = sharding.parameter_shardings(jax.eval_shape(init, student), mesh)
    return jax.jit(init, out_shardings=state_shardings)(student), state_shardings


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
    shapes = [_leaf_shapes(teacher), _leaf_shapes(student)]
    differing = sorted(k for k in shapes[0].keys() | shapes[1].keys() if shapes[0].get(k) != shapes[1].get(k))
    if differing:
        examples = "; ".join(f"{k}: {shapes[0].get(k)} in the teacher, {shapes[1].get(k)} here" for k in differing[:3])
        raise TrainingError(
            f"config.model.student_init {source} is not the teacher's architecture ({len(differing)} parameters "
            f"differ, e.g. {examples}): use a UNet of the same model family as config.model.path, or leave "
            "student_init empty to start from the teacher"
        )


def _leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    return {jax.tree_util.keystr(path): np.shape(x) for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def _loop(run: Run, state: step.TrainState) -> step.TrainState:
    """Step, report, checkpoint and sample until config.train.num_steps, a stop request or a non-finite step."""
    config, total = run.config, run.config.train.num_steps
    with (
        Stop(run.first_step) as stop,
        contextlib.closing(reporting.Reporter(run.workdir, run.first_step)) as reporter,
        contextlib.closing(run.checkpoints),
    ):
        samples = reporting.Samples(config, run.workdir, run.components, run.model, run.frozen, run.mesh, reporter)
        fid_eval = reporting.FIDEval(config, samples.student_generator, reporter) if config.eval.fid_every else None
        progress = reporting.Progress(total, config.train.global_batch_size, run.learning_rate)
        base_key = jax.random.key(config.train.seed)
        pending: list[tuple[int, dict]] = []  # (step, metrics) not yet brought to the host
        compiled, stopped_at = None, None
        if run.first_step == 0:
            samples.teacher()
        for step_number in range(run.first_step, total):
            batch = sharding.global_batch(next(run.iterator), run.mesh)
            rng = jax.random.fold_in(base_key, step_number)
            if compiled is None:
                compiled, progress.flops_per_step = _compile(run, state, batch, rng)
                progress.restart(step_number)
            state, metrics = compiled(state, batch, rng, run.frozen)
            run.checkpoints.check()  # a save that failed stops the run here
            done = step_number + 1
            pending.append((done, metrics))
            stopping = stop.agreed(done)
            if done % config.log.every_steps == 0 or done == total or stopping:
                _check_finite(pending)
                values, line = progress.report(pending, done)
                reporter.scalars(done, values, line)
                pending.clear()
            if done % config.checkpoint.every_steps == 0 or done == total or stopping:
                _check_finite(pending)
                pending.clear()
                run.checkpoints.save(done, state, run.iterator, config.to_dict())
            grid = done % config.log.eval_every_steps == 0 or done == total
            measure = fid_eval is not None and (done % config.eval.fid_every == 0 or done == total)
            unet = _sampled_unet(run, state) if grid or measure else None
            if grid:
                samples.student(done, unet)
            if measure:
                fid_eval(done, unet)
            if stopping:
                print(f"stopped at step {done} on request; the checkpoint of step {done} resumes the run", flush=True)
                stopped_at = done
                break
    if stopped_at is not None and stopped_at < total:
        raise Stopped(stopped_at, stop.signum)
    return state


def _sampled_unet(run: Run, state: step.TrainState) -> Any:
    """The UNet of the sample grids: the EMA, or a LoRA student's adapters merged into the teacher."""
    if run.components.lora is None:
        return state.ema_params
    merge = functools.partial(step.student_unet, components=run.components)
    placement = jax.tree.map(lambda x: x.sharding, run.frozen["teacher"])
    return jax.jit(merge, out_shardings=placement)(state.params, run.frozen)


def _compile(run: Run, state: step.TrainState, batch: dict[str, jax.Array], rng: jax.Array) -> tuple[Any, float | None]:
    """The step compiled (or loaded from the compilation cache) for this batch's shapes, and its FLOPs over the
    global batch (for MFU); prints the time."""
    start = time.perf_counter()
    lowered = run.train_step.lower(state, batch, rng, run.frozen)
    with compile_cache.Loads() as loads:
        compiled = lowered.compile()
    accumulation_steps = run.config.train.gradient_accumulation_steps
    flops_per_step = flops.train_step_flops(
        lowered, run.components, run.settings, state.params, run.frozen, batch, accumulation_steps
    )
    cached = " (loaded from the compilation cache)" if loads.count else ""
    print(f"compiled the training step in {time.perf_counter() - start:.1f} s{cached}", flush=True)
    return compiled, flops_per_step


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


class Stop:
    """Set by SIGTERM or Ctrl-C (a second Ctrl-C aborts at once); every process stops after the same step.

    One process: its own SIGTERM and SIGINT handlers set a flag. Several: SIGTERM is the notice of
    JAX's preemption service (``jax.distributed.initialize`` starts it and it owns SIGTERM), which
    fixes the step to stop after through the coordination service, off the devices; Ctrl-C is passed
    on to it as a SIGTERM to this process. The service counts steps from ``first_step`` (the step the
    run resumes from) once the loop starts: a notice before that stops a new run after its first step
    and is lost on a resumed one. A context manager: the previous signal handlers are back at the end.
    """

    def __init__(self, first_step: int = 0):
        self.requested = False
        self.signum = signal.SIGTERM  # the signal this process got (another process's request counts as SIGTERM)
        self._previous = {}
        self._joined = jax.process_count() > 1
        self._first_step = first_step

    def __enter__(self) -> Stop:
        for sig in (signal.SIGINT,) if self._joined else (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        if self._joined:
            multihost_utils.reached_preemption_sync_point(self._first_step)
        return self

    def __exit__(self, *exc_info) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.requested:
            raise KeyboardInterrupt
        self.requested, self.signum = True, signum
        print(
            f"{signal.Signals(signum).name}: stopping after this step with a checkpoint"
            + (" (Ctrl-C again: stop at once, without one)" if signum == signal.SIGINT else ""),
            file=sys.stderr,
            flush=True,
        )
        if self._joined:
            os.kill(os.getpid(), signal.SIGTERM)

    def agreed(self, step: int) -> bool:
        """Whether to stop after ``step``, just dispatched; every process gets the same answer at the same step.

        One process: at once. Several (called at every step by each): ``reached_preemption_sync_point``,
        true at the step after the furthest process's step when a notice reached the service (about a
        second after the SIGTERM); it neither waits for the devices nor runs anything on them.
        """
        if not self._joined:
            return self.requested
        return multihost_utils.reached_preemption_sync_point(step)
