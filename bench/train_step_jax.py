"""The JAX part of the train-step benchmark: this project's compiled step, and its teacher and
student halves, lowered ahead of time, compiled in the background and timed stage by stage."""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import os
import platform
import time
from collections.abc import Callable

import flax
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import optax

from bench.common import Recorder, device_memory, memory_analysis, time_calls
from bench.train_step_spec import ModelSpec, check_metrics, host_batch, null_batch, part_plan, spec_for
from perflow_jax import lora, loss, pipeline, sharding, step
from perflow_jax.flops import cost_flops
from perflow_jax.models.clip import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from perflow_jax.models.unet import UNet2DConditionModel, UNetConfig
from perflow_jax.schedule import alphas_cumprod_from_config


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """How the benchmarked step is built: attention backends, student rematerialisation, microbatches.

    ``teacher_attention`` is the backend of the frozen teacher and text encoders (None: ``attention``),
    to compare backends: ``auto`` already runs them on cuDNN wherever its forward takes the shapes
    (they are never differentiated).
    """

    attention: str = "auto"
    teacher_attention: str | None = None
    remat: str = "none"
    accumulation: int = 1
    lora_rank: int = 0  # > 0: a LoRA student of this rank (lora_alpha 8, the authors' targets) on the teacher

    @property
    def frozen_attention(self) -> str:
        return self.teacher_attention or self.attention


class JaxStep:
    """This project's step for one model, ready to lower: components, settings, placements, abstract arguments.

    ``lower(name, batch)`` lowers the whole step (``step_*``, state donated), its teacher half
    (``teacher_*``: draws, text encoding, dropout, window solve) or its student half (``student_*``:
    prediction, loss, gradients, clipped AdamW, EMA) at a per-device batch, from abstract
    arguments: nothing needs the weights. Data parallel over all devices (one GPU: a 1 x 1 mesh).
    """

    def __init__(self, spec: ModelSpec, options: StepOptions):
        self.spec = spec
        self.accumulation = options.accumulation
        self.mesh = sharding.make_mesh((-1, 1))
        self.n_devices = self.mesh.devices.size
        unet_cfg = UNetConfig.from_dict(spec.unet)
        frozen_attention = options.frozen_attention
        texts = [
            cls(CLIPTextConfig.from_dict(c), dtype=jnp.bfloat16, attention_backend=frozen_attention)
            for cls, c in zip((CLIPTextModel, CLIPTextModelWithProjection), spec.text_encoders, strict=False)
        ]
        student = UNet2DConditionModel(
            unet_cfg, dtype=jnp.bfloat16, attention_backend=options.attention, remat=options.remat
        )
        self.components = step.Components(
            student=student,
            teacher=UNet2DConditionModel(unet_cfg, dtype=jnp.bfloat16, attention_backend=frozen_attention),
            text=pipeline.TextEncoders(*texts, resolution=8 * spec.latent_size),
            alphas_cumprod=alphas_cumprod_from_config(spec.scheduler),
            scaling_factor=spec.scaling_factor,
            lora=lora.LoraSpec(options.lora_rank, 8.0) if options.lora_rank else None,
        )
        self.settings = step.PeRFlowSettings(**spec.settings)
        self.optimizer = step.make_optimizer(spec.learning_rate)
        self.text_names = ["text_encoder", "text_encoder_2"][: len(texts)]

        self.replicated, self.batch_sharding = sharding.replicated(self.mesh), sharding.batch_sharding(self.mesh)
        self.unet_shapes = self.components.student.abstract_params()
        self.text_shapes = {n: m.abstract_params() for n, m in zip(self.text_names, texts, strict=True)}
        if self.components.lora is None:
            state_shapes = jax.eval_shape(lambda p: step.create_train_state(p, self.optimizer), self.unet_shapes)
        else:
            adapters = functools.partial(lora.init_adapters, params=self.unet_shapes, lora=self.components.lora)
            state_shapes = jax.eval_shape(
                lambda k: step.create_train_state(adapters(k), self.optimizer, ema=False), jax.random.key(0)
            )
        self.state_shardings = sharding.parameter_shardings(state_shapes, self.mesh)
        bf16 = functools.partial(jax.tree.map, lambda a: jax.ShapeDtypeStruct(a.shape, jnp.bfloat16))
        frozen_shapes = {"teacher": bf16(self.unet_shapes), **{n: bf16(t) for n, t in self.text_shapes.items()}}
        frozen_shapes["null_cond"] = jax.eval_shape(self.encode_text, frozen_shapes, null_batch(spec, 1))
        self.frozen_shardings = sharding.parameter_shardings(
            {k: v for k, v in frozen_shapes.items() if k != "null_cond"}, self.mesh
        )
        self.frozen_shardings["null_cond"] = jax.tree.map(lambda _: self.replicated, frozen_shapes["null_cond"])
        self.state_abstract = with_shardings(state_shapes, self.state_shardings)
        self.frozen_abstract = with_shardings(frozen_shapes, self.frozen_shardings)
        self.rng_abstract = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=self.replicated)
        self._reflow_shapes = {}

    def encode_text(self, frozen, ids):
        return self.components.text.encode(frozen, ids)

    def batch_abstract(self, batch_size: int) -> dict:
        """A batch of ``batch_size`` per device as abstract arrays split over the devices."""
        host = host_batch(self.spec, batch_size * self.n_devices, 0)
        return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=self.batch_sharding) for k, v in host.items()}

    def teacher_part(self, batch, rng, frozen):
        """The first half of step.train_step: draws, text encoding, dropout and the window solve."""
        examples = step.draw_examples(rng, batch, components=self.components, settings=self.settings)
        return step.reflow_problem(examples, frozen, components=self.components, settings=self.settings)

    def student_part(self, state, reflow):
        """The second half of step.train_step: prediction, loss, gradients, clipped AdamW, EMA."""
        components, settings = self.components, self.settings

        def loss_fn(params):
            prediction = pipeline.unet_apply(components.student, params)(reflow.z_t, reflow.t * 1000.0, reflow.cond)
            return loss.reflow_loss(prediction, reflow, num_windows=settings.num_windows)

        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        metrics["grad_norm"] = optax.tree.norm(grads)
        return step.apply_gradients(state, grads, optimizer=self.optimizer, settings=settings), metrics

    def reflow_abstract(self, batch_size: int):
        """The teacher half's output (a loss.Reflow) as abstract arrays, traced once per batch size."""
        if batch_size not in self._reflow_shapes:
            self._reflow_shapes[batch_size] = jax.eval_shape(
                self.teacher_part, self.batch_abstract(batch_size), self.rng_abstract, self.frozen_abstract
            )
        return self._reflow_shapes[batch_size]

    def lower(self, name: str, batch_size: int):
        """jax.jit(...).lower(...) of ``step``, ``teacher`` or ``student`` (the name's prefix) at ``batch_size``."""
        batch = self.batch_abstract(batch_size)
        if name.startswith("step"):
            full = functools.partial(
                step.train_step,
                components=self.components,
                settings=self.settings,
                optimizer=self.optimizer,
                accumulation_steps=self.accumulation,
            )
            jitted = jax.jit(
                full,
                in_shardings=(self.state_shardings, self.batch_sharding, self.replicated, self.frozen_shardings),
                out_shardings=(self.state_shardings, self.replicated),
                donate_argnums=0,
            )
            return jitted.lower(self.state_abstract, batch, self.rng_abstract, self.frozen_abstract)
        reflow = self.reflow_abstract(batch_size)
        reflow_shardings = jax.tree.map(lambda _: self.batch_sharding, reflow)
        if name.startswith("teacher"):
            jitted = jax.jit(
                self.teacher_part,
                in_shardings=(self.batch_sharding, self.replicated, self.frozen_shardings),
                out_shardings=reflow_shardings,
            )
            return jitted.lower(batch, self.rng_abstract, self.frozen_abstract)
        jitted = jax.jit(
            self.student_part,
            in_shardings=(self.state_shardings, reflow_shardings),
            out_shardings=(self.state_shardings, self.replicated),
            donate_argnums=0,
        )
        return jitted.lower(self.state_abstract, with_shardings(reflow, reflow_shardings))

    def unet_forward_flops(self) -> float | None:
        """Lowered (pre-optimisation) cost of one bfloat16 UNet forward of one sample, XLA attention (counted)."""
        unet = UNet2DConditionModel(self.components.student.config, dtype=jnp.bfloat16, attention_backend="xla")
        inputs = unet.dummy_inputs(batch=1, size=self.spec.latent_size, text_len=self.spec.text_len)
        args = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in inputs]
        params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.bfloat16), self.unet_shapes)
        return cost_flops(jax.jit(lambda p, *a: unet.apply({"params": p}, *a)).lower(params, *args))


def with_shardings(tree, shardings):
    """Abstract arrays (ShapeDtypeStruct) of ``tree``'s shapes and dtypes, placed by ``shardings``."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def run_jax(part: str, args: argparse.Namespace, rec: Recorder) -> None:
    """The part: lower the first function and compile it while the weights are placed, then each in turn."""
    spec = spec_for(part, args)
    options = StepOptions(
        attention=args.attention,
        teacher_attention=args.teacher_attention,
        remat=args.sdxl_remat if spec.sdxl else "none",
        accumulation=args.sdxl_accumulation if spec.sdxl else 1,
    )
    device = jax.devices()[0]
    rec.results.update(
        device_kind=device.device_kind,
        platform=jax.default_backend(),
        device_count=jax.device_count(),
        versions={
            "python": platform.python_version(),
            "jax": jax.__version__,
            "jaxlib": jaxlib.__version__,
            "flax": flax.__version__,
            "optax": optax.__version__,
            "numpy": np.__version__,
        },
        env={k: os.environ.get(k) for k in ("XLA_FLAGS", "XLA_PYTHON_CLIENT_MEM_FRACTION")},
        attention=options.attention,
        teacher_attention=options.frozen_attention,
        remat=options.remat,
        accumulation=options.accumulation,
        dtypes="student float32 master weights, bfloat16 compute; teacher and text encoders bfloat16",
    )
    bench = JaxStep(spec, options)
    n_devices = bench.n_devices
    step_batches, alone_batch = part_plan(part, args)
    plan = [f"step_b{step_batches[0]}", f"teacher_b{alone_batch}", f"student_b{alone_batch}"]
    plan += [f"step_b{b}" for b in step_batches[1:]]
    batch_of = {name: int(name.split("_b")[1]) for name in plan}
    compiler = concurrent.futures.ThreadPoolExecutor(1)
    lowered, compiling = {}, {}

    def lower_stage(name):
        with rec.stage(f"lower {name}", batch=batch_of[name]) as row:
            start = time.perf_counter()
            lowered[name] = bench.lower(name, batch_of[name])
            row["lower_s"] = time.perf_counter() - start
            row["flops_lowered"] = cost_flops(lowered[name])
        if name in lowered:
            rec.log(f"{name}: lowered in {rec.results['stages'][f'lower {name}']['lower_s']:.1f} s")

    def compile_in_background(name):
        def work():
            start = time.perf_counter()
            compiled = lowered[name].compile()
            return compiled, time.perf_counter() - start

        compiling[name] = compiler.submit(work)
        rec.results["stages"].setdefault(f"compile {name}", {})["submitted_at_s"] = time.perf_counter() - rec.clock

    # 1. The first function is lowered, and compiled in the background while the weights are placed.
    lower_stage(plan[0])
    if plan[0] in lowered:
        compile_in_background(plan[0])
    host = {}
    with rec.stage("init") as row:
        start = time.perf_counter()
        host["unet"] = host_random_params(bench.unet_shapes, seed=0)
        host.update({n: host_random_params(t, seed=1 + i) for i, (n, t) in enumerate(bench.text_shapes.items())})
        row["host_random_s"] = time.perf_counter() - start
        rec.log(f"init: random weights drawn on the host in {row['host_random_s']:.1f} s")
        start = time.perf_counter()
        state = make_state(host["unet"], bench.optimizer, bench.state_shardings)
        frozen = make_frozen(host, bench.text_names, bench.frozen_shardings)
        frozen["null_cond"] = jax.jit(bench.encode_text, out_shardings=bench.replicated)(frozen, null_batch(spec, 1))
        jax.block_until_ready((state, frozen))
        row["device_s"] = time.perf_counter() - start
        row["parameters"] = {
            "student": int(sum(x.size for x in jax.tree.leaves(state.params))),
            **{n: int(sum(x.size for x in jax.tree.leaves(frozen[n]))) for n in bench.text_names},
        }
        row["memory_after_init"] = device_memory(device)
        rec.log(
            f"init: state and frozen weights on the device in {row['device_s']:.1f} s; student "
            f"{row['parameters']['student'] / 1e6:.1f} M parameters"
        )
    if not rec.ok("init"):
        return
    # 2. The other functions are traced meanwhile; then each is compiled and timed in turn.
    for name in plan[1:]:
        lower_stage(name)
    with rec.stage("lower unet forward (FLOP count)") as row:
        row["flops_per_sample"] = bench.unet_forward_flops()
    live = {"state": state, "reflow": None}
    del state
    keys = [jax.device_put(k, bench.replicated) for k in jax.random.split(jax.random.key(1), args.warmup + args.iters)]
    for name in plan:
        if name not in lowered:
            continue
        batch_size = batch_of[name] * n_devices
        if name not in compiling:
            compile_in_background(name)
        with rec.stage(f"compile {name}", batch=batch_of[name]) as row:
            compiled, row["compile_s"] = compiling[name].result()
            row["flops_compiled"] = cost_flops(compiled)
            row["memory_analysis"] = memory_analysis(compiled)
            rec.log(f"{name}: compiled in {row['compile_s']:.1f} s")
        if not rec.ok(f"compile {name}"):
            continue
        with rec.stage(f"run {name}", batch=batch_of[name], global_batch=batch_size) as row:
            if any(x.is_deleted() for x in jax.tree.leaves(live["state"])):
                rec.log("re-creating the state (a failed call consumed the donated one)")
                live["state"] = make_state(host["unet"], bench.optimizer, bench.state_shardings)
            if name.startswith("student") and live["reflow"] is None:
                raise RuntimeError("the student half needs the teacher half's output, which failed")
            batch = jax.device_put(host_batch(spec, batch_size, seed=batch_size), bench.batch_sharding)
            metrics = []
            call = jax_call(name, compiled, batch, frozen, iter(keys), live, metrics)
            row.update(time_calls(call, jax.block_until_ready, args.iters, args.warmup))
            row["samples_per_s"] = batch_size / (row["median_ms"] / 1e3)
            row["memory"] = device_memory(device)
            if metrics:
                summary, failures = check_metrics([jax.tree.map(np.asarray, m) for m in metrics], batch_size)
                row.update(summary)
                rec.results["failures"].extend(f"{name}: {f}" for f in failures)
            peak = (row["memory"] or {}).get("peak_bytes_in_use")
            rec.log(
                f"{name}: median {row['median_ms']:.1f} ms, {row['samples_per_s']:.1f} samples/s"
                + (f", running peak {peak / 1e9:.1f} GB" if peak else "")
            )
        if name.startswith("student"):
            live["reflow"] = None  # the teacher half's output is not needed any more
    compiler.shutdown()


def jax_call(name: str, compiled, batch, frozen, keys, live: dict, metrics: list) -> Callable:
    """``call()`` for ``time_calls``: the next call of a compiled step or half (each with the next of
    ``keys``), returning its outputs; ``live`` holds the (donated) state and the teacher half's last
    output, which the student half takes."""

    def call():
        if name.startswith("teacher"):
            live["reflow"] = out = compiled(batch, next(keys), frozen)
        else:
            args = (live["reflow"],) if name.startswith("student") else (batch, next(keys), frozen)
            live["state"], m = out = compiled(live["state"], *args)
            metrics.append(m)
        return out

    return call


def host_random_params(shapes, seed: int, workers: int = 16) -> dict:
    """Random float32 numpy parameters of the given shapes: scales 1, biases 0, other leaves normal(0, 0.02).

    Drawn in threads (numpy's generators release the GIL), one generator per leaf.
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    seeds = np.random.SeedSequence(seed).spawn(len(leaves))

    def make(i):
        path, leaf = leaves[i]
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "scale":
            return np.ones(leaf.shape, np.float32)
        if name == "bias":
            return np.zeros(leaf.shape, np.float32)
        values = np.random.default_rng(seeds[i]).standard_normal(leaf.shape, np.float32)
        values *= 0.02
        return values

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        values = list(pool.map(make, range(len(leaves))))
    return jax.tree_util.tree_unflatten(treedef, values)


def make_state(params, optimizer, shardings) -> step.TrainState:
    """A train state on the device from host parameters: student and EMA transferred separately (no
    shared buffer, the state is donated), the optimizer state initialised on the device."""
    student = jax.device_put(params, shardings.params)
    ema = jax.device_put(params, shardings.ema_params)
    opt_state = jax.jit(optimizer.init, out_shardings=shardings.opt_state)(student)
    zero = jax.device_put(np.zeros((), np.int32), shardings.step)
    return step.TrainState(step=zero, params=student, opt_state=opt_state, ema_params=ema)


def make_frozen(host, text_names, shardings) -> dict:
    """Teacher (a copy of the student's initial weights) and text encoders, cast to bfloat16 on the device."""
    to_bf16 = functools.partial(jax.tree.map, lambda x: x.astype(jnp.bfloat16))
    frozen = {}
    for name, source in [("teacher", "unet"), *((n, n) for n in text_names)]:
        frozen[name] = jax.jit(to_bf16, out_shardings=shardings[name])(jax.device_put(host[source], shardings[name]))
    return frozen
