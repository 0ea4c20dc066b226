"""``python -m perflow_jax.evaluate``: FID and CLIP score of a PeRFlow student, or of its teacher's DDIM.

    python -m perflow_jax.evaluate --model WORKDIR_OR_FOLDER --prompts FILE --reference REF [REF ...] \\
        --inception pt_inception-2015-12-05-6726825d.pth [--clip CLIP_FOLDER] \\
        --steps 4 8 --guidance 4.5 --num-images 30000 --out DIR

For each --steps N the model draws --num-images images (the student's PeRFlow sampler, or with
--teacher-ddim the teacher's N-step DDIM), --batch-size at a time over every device of every
host, from the seed's noise (image j's as ``python -m perflow_jax.sample`` draws it). Each batch
is quantized to 8 bits, as a PNG stores it, and goes through the feature network (the FID
Inception-v3 of pytorch-fid: ``--inception``; or ``--features digits``, the demo's classifier)
and, with ``--clip``, the CLIP towers (CLIP score: torchmetrics' formula). The Frechet distance
to every reference is ``perflow_jax.fid.frechet_distance``.

--prompts: a text file, one prompt per line, used in turn (image j gets prompt j mod P); or COCO's
  ``captions_val2014.json`` (any file with COCO's "annotations": image_id and caption): --num-images
  distinct images drawn with --prompt-seed and one of each image's captions, as COCO-30k does.
--reference (one or more): a statistics file that this command wrote (``DIR/references/*.npz``),
  which must have been made with the same feature network, image size and resize rule; or
  images: a folder, webdataset .tar files, a prepared data folder (its source images) or any
  source ``prepare_data`` reads (``digits:train``), each image's shorter side resized to the
  evaluation's image size and the centre cut out (corrupt images skipped and counted), their
  statistics cached as ``DIR/references/NAME.npz`` for reuse; or ``teacher:N``, the teacher's
  N-step DDIM images of the same prompts from other noise (seed + 1) at --teacher-guidance (the
  paper's third column: FID against the teacher's own images).

Nothing is lost when a run stops: after each batch the running statistics of its sampler go to
``DIR/progress/NAME.npz`` (with the number of finished batches), and a new run with the same
settings continues after the last finished batch, so no image is counted twice or left out.
``DIR/settings.json`` holds the settings (--save-images among them: a resumed run writes every
image or none); a DIR made with other settings is refused unless --overwrite. Results:
``DIR/metrics.json`` (FID per sampler and reference, CLIP score, images, seconds, images/s, the
settings and versions), ``DIR/NAME.png`` (a grid of the first batch) and, with --save-images, every
image as ``DIR/images/NAME/XXXXX.png`` for other tools.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import os
import platform
import re
import shutil
import sys
import time
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from perflow_jax import compile_cache, console, fid, fid_inception, image_io, pipeline, prepare_data, sample, sharding
from perflow_jax.weights import COMPUTE_DTYPES, read_json

FEATURES = {"inception": fid_inception.FEATURE, "digits": "digits-mlp-64"}  # --features -> fid.FeatureSpec.feature
DEFAULT_BATCH_SIZE = sample.DEFAULT_BATCH_SIZE
TEACHER_REFERENCE = re.compile(r"teacher:(\d+)$")
RESIZE = "center-crop"  # how every image reaches the evaluation's size (see ``reference_images``)
PROGRESS_VERSION = 1


class EvaluateError(ValueError):
    """The arguments, the output folder or a reference do not allow the evaluation."""


class OtherSettings(EvaluateError):
    """--out holds an evaluation made with other settings (``--overwrite`` starts afresh)."""


# ---------------------------------------------------------------------------------------------
# What the images are measured with


@dataclasses.dataclass(frozen=True)
class Features:
    """A feature network as FID uses it: ``compute(images)`` maps [B, S, S, 3] uint8 to [B, dim] features."""

    name: str  # fid.FeatureSpec.feature
    dim: int
    compute: Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Agreement:
    """How well images follow their prompts: ``score(images, prompts)`` gives one value per image; the
    metric is ``final(mean)`` (CLIP score: 100 x cosine, the mean clipped at 0; digits: accuracy)."""

    name: str
    score: Callable[[np.ndarray, Sequence[str]], np.ndarray]
    final: Callable[[float], float] = float


def inception_features(path: str | Path, mesh: jax.sharding.Mesh) -> Features:
    """pytorch-fid's Inception-v3 pool3 features (2048), computed over ``mesh``'s devices."""
    module, params = fid_inception.load_inception(path)
    params = sharding.place(params, sharding.replicated(mesh))
    apply = jax.jit(lambda p, x: module.apply({"params": p}, x / 255.0), out_shardings=sharding.replicated(mesh))
    return Features(FEATURES["inception"], 2048, lambda images: _on_devices(apply, params, images, mesh))


def digit_features() -> Features:
    """The demo's digit classifier's last hidden layer (64), on the host."""
    from perflow_jax.demo import classifier

    return Features(FEATURES["digits"], classifier.HIDDEN[-1], classifier.features)


def clip_agreement(folder: str | Path, mesh: jax.sharding.Mesh) -> Agreement:
    """CLIP score of a transformers CLIP folder (e.g. openai/clip-vit-large-patch14, the paper's)."""
    from perflow_jax import clip_score as cs

    clip = cs.load_clip(folder)
    params = sharding.place({"vision": clip.vision_params, "text": clip.text_params}, sharding.replicated(mesh))
    size = clip.vision.config.image_size

    def cosines(p, images, ids):
        image = clip.vision.apply({"params": p["vision"]}, cs.preprocess(images, size)).image_embeds
        text = clip.text.apply({"params": p["text"]}, ids).text_embeds
        return cs.cosine_scores(image, text)

    apply = jax.jit(cosines, out_shardings=sharding.replicated(mesh))

    def score(images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        return _on_devices(lambda p, x: apply(p, x[0], x[1]), params, (images, clip.tokenize(list(prompts))), mesh)

    return Agreement("clip_score", score, lambda mean: max(mean, 0.0))


def digit_agreement() -> Agreement:
    """The demo's classifier accuracy: the fraction of images classified as the digit their prompt names."""
    from perflow_jax.demo import classifier, digits

    labels = {digits.caption(label): label for label in range(10)}

    def score(images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        unknown = sorted({p for p in prompts if p not in labels})
        if unknown:
            raise EvaluateError(
                f"prompt {unknown[0]!r} names no digit: the digits classifier scores the demo's captions"
            )
        return (classifier.predict(images) == np.array([labels[p] for p in prompts])).astype(np.float64)

    return Agreement("classifier_accuracy", score)


def _on_devices(apply, params, inputs, mesh: jax.sharding.Mesh) -> np.ndarray:
    """``apply(params, inputs)`` with the batch split over ``mesh`` (padded to a multiple of its devices)."""
    count = len(jax.tree.leaves(inputs)[0])
    padded = -(-count // mesh.size) * mesh.size
    inputs = jax.tree.map(lambda x: np.pad(x, [(0, padded - count)] + [(0, 0)] * (x.ndim - 1), mode="edge"), inputs)
    return np.asarray(apply(params, sharding.place(inputs, sharding.batch_sharding(mesh))), np.float64)[:count]


# ---------------------------------------------------------------------------------------------
# Prompts


def read_prompts(path: str | Path, count: int, seed: int) -> list[str]:
    """``count`` prompts: a text file's lines in turn, or COCO captions of ``count`` distinct images."""
    path = Path(path)
    if not path.is_file():
        raise EvaluateError(f"--prompts {path} does not exist: give a text file or COCO's captions_val2014.json")
    if path.suffix.lower() != ".json":
        prompts = sample.read_prompts(path)
        return [prompts[j % len(prompts)] for j in range(count)]
    annotations = read_json(path).get("annotations")
    if not isinstance(annotations, list) or not annotations:
        raise EvaluateError(f'--prompts {path} has no COCO "annotations" list (image_id, caption)')
    captions: dict[int, list[str]] = {}
    for a in annotations:
        if isinstance(a, dict) and isinstance(a.get("caption"), str) and a["caption"].strip():
            captions.setdefault(a.get("image_id"), []).append(a["caption"].strip())
    if len(captions) < count:
        raise EvaluateError(
            f"--prompts {path} has captions of {len(captions)} images, fewer than --num-images {count}: lower it"
        )
    rng = np.random.default_rng(seed)
    images = sorted(captions, key=str)
    chosen = rng.choice(len(images), size=count, replace=False)
    return [captions[images[i]][rng.integers(len(captions[images[i]]))] for i in chosen]


# ---------------------------------------------------------------------------------------------
# Resumable accumulation


@dataclasses.dataclass
class Progress:
    """One image set's running measures: finished batches, feature statistics, agreement sum, counts."""

    batches: int
    stats: fid.FeatureStats
    agreement_sum: float = 0.0
    skipped: Counter = dataclasses.field(default_factory=Counter)
    seconds: float = 0.0

    @classmethod
    def start(cls, dim: int) -> Progress:
        return cls(0, fid.FeatureStats(dim))

    def save(self, path: Path) -> None:
        """The whole state in one file, replaced whole (a stop between batches loses nothing counted)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".writing.npz")
        np.savez(
            partial,
            version=PROGRESS_VERSION,
            batches=self.batches,
            count=self.stats.count,
            mean=self.stats.mean,
            m2=self.stats.m2,
            agreement_sum=self.agreement_sum,
            skipped=json.dumps(dict(self.skipped)),
            seconds=self.seconds,
        )
        os.replace(partial, path)

    @classmethod
    def load(cls, path: Path, dim: int) -> Progress:
        """The saved state, or a fresh one when ``path`` does not exist."""
        if not path.is_file():
            return cls.start(dim)
        try:
            with np.load(path, allow_pickle=False) as f:
                data = {k: f[k] for k in f.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
            raise EvaluateError(f"cannot read {path} ({error}): delete it to redo that image set") from error
        if int(data.get("version", -1)) != PROGRESS_VERSION or data["mean"].shape != (dim,):
            raise EvaluateError(f"{path} was not written by this version with {dim}-d features: delete it")
        stats = fid.FeatureStats(dim)
        stats.count, stats.mean, stats.m2 = int(data["count"]), data["mean"], data["m2"]
        skipped = Counter(json.loads(str(data["skipped"])))
        return cls(int(data["batches"]), stats, float(data["agreement_sum"]), skipped, float(data["seconds"]))


def accumulate(
    name: str,
    batches: Iterator[tuple[np.ndarray, Sequence[str] | None, Counter]],
    total: int | None,
    features: Features,
    agreement: Agreement | None,
    state: Path,
    on_batch: Callable[[int, np.ndarray], None] = lambda index, images: None,
) -> Progress:
    """Measures ``batches`` (images uint8, their prompts or None, skip counts) into the progress saved at ``state``.

    ``batches`` starts at the first batch that progress has not counted (the callers build it from
    the saved batch count). After each batch, on process 0, ``on_batch(index, images)`` runs and then
    the state is saved, so a stop between batches loses nothing and counts nothing twice.
    """
    progress = Progress.load(state, features.dim)
    bar = tqdm(total=total, initial=progress.batches, desc=name, unit="batch", dynamic_ncols=True, file=sys.stderr)
    with bar:
        last = time.perf_counter()
        for images, prompts, skipped in batches:  # drawing or reading a batch happens in this line
            if len(images):
                progress.stats.add(features.compute(images))
                if agreement is not None and prompts is not None:
                    progress.agreement_sum += float(np.sum(agreement.score(images, prompts)))
            progress.skipped.update(skipped)
            progress.seconds += time.perf_counter() - last
            last = time.perf_counter()
            progress.batches += 1
            if jax.process_index() == 0:
                on_batch(progress.batches - 1, images)
                progress.save(state)
            bar.update(1)
            bar.set_postfix(images=progress.stats.count, refresh=False)
    return progress


def generated_batches(
    generator: pipeline.Generator,
    prompts: Sequence[str],
    seed: int,
    latent_shape,
    batch_size: int,
    first: int,
    unet_params: Any = None,
) -> Iterator[tuple[np.ndarray, Sequence[str], Counter]]:
    """Batches ``first``, ``first + 1``, ... of the images of ``prompts`` (image j from the seed's noise j);
    ``unet_params`` in place of the generator's (a training run's EMA)."""
    for start in range(first * batch_size, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        noise = pipeline.seed_noise(seed, len(chunk), latent_shape, start=start)
        output = generator(chunk, noise, unet_params=unet_params, pad_to=min(batch_size, len(prompts)))
        yield image_io.to_uint8(output.images), chunk, Counter()


def reference_images(
    source: str, size: int, batch_size: int, first: int
) -> tuple[int | None, Iterator[tuple[np.ndarray, None, Counter]]]:
    """(the number of batches if known, batches ``first``, ... of a source's images as uint8 [B, size, size, 3]).

    The shorter side is resized to ``size`` (bicubic) and the centre cut out, as ``prepare_data`` does;
    unreadable, corrupt or oversized images are skipped and counted by reason.
    """
    folder = Path(source)
    if (folder / prepare_data.STATE_FILE).is_file():  # a prepared data folder: its source images
        source = read_json(folder / prepare_data.STATE_FILE)["source"]
    try:
        count, items = prepare_data.open_source(source)
    except prepare_data.PrepareError as error:
        raise EvaluateError(f"--reference {source}: {error}") from error

    def batches():
        chunks = prepare_data.chunks(items, batch_size)
        for _ in range(first):
            next(chunks, None)
        for chunk in chunks:
            pixels, skipped = [], Counter()
            for item in chunk:
                image, reason = prepare_data.read_image(item, prepare_data.MAX_PIXELS)
                if reason:
                    skipped[reason] += 1
                    continue
                crop = prepare_data.center_crop(image, size)[0]
                pixels.append(np.round((crop + 1.0) * 127.5).astype(np.uint8))
            yield np.stack(pixels) if pixels else np.zeros((0, size, size, 3), np.uint8), None, skipped

    return (None if count is None else -(-count // batch_size)), batches()


# ---------------------------------------------------------------------------------------------
# The evaluation


@dataclasses.dataclass(frozen=True)
class Options:
    """The command line's options, one field per flag (``--help`` and the module docstring say what each does)."""

    model: str | os.PathLike
    prompts: Path
    references: Sequence[str]
    out: Path
    steps: Sequence[int] = (4,)
    teacher_ddim: bool = False
    guidance: float | None = None
    teacher_guidance: float = sample.TEACHER_GUIDANCE
    num_images: int = 30000
    batch_size: int = DEFAULT_BATCH_SIZE
    seed: int = 0
    prompt_seed: int = 0
    features: str = "inception"
    inception: Path | None = None
    clip: Path | None = None
    height: int | None = None
    dtype: str = "float32"
    weights: str | None = None
    save_images: bool = False
    overwrite: bool = False


def evaluate(options: Options, log: Callable[[str], Any] = print) -> dict[str, Any]:
    """Runs the evaluation the options describe (see the module docstring) and returns metrics.json's content."""
    o = options
    _check(o)
    prompts = read_prompts(o.prompts, o.num_images, o.prompt_seed)
    plans = {}
    for n in o.steps:
        sample_options = _sample_options(o, n, teacher=o.teacher_ddim, prompts=prompts, guidance=o.guidance)
        plans[_sampler_name(n, o.teacher_ddim)] = (sample_options, _plan(sample_options))
    first_plan = next(iter(plans.values()))[1]
    size = first_plan.height
    teachers = {}
    for reference in o.references:
        match = TEACHER_REFERENCE.match(reference)
        if match:
            guidance = o.teacher_guidance  # whatever --guidance the evaluated sampler takes
            teacher_options = _sample_options(o, int(match[1]), teacher=True, prompts=prompts, guidance=guidance)
            teachers[reference] = (teacher_options, _plan(teacher_options))
        elif reference.endswith(".npz"):
            _read_reference(reference, fid.FeatureSpec(FEATURES[o.features], size, RESIZE))
        else:
            reference_images(reference, size, o.batch_size, 0)  # checks that the source opens
    settings = {**_settings(o, prompts, size), "model_step": first_plan.description.step}
    _prepare_out(o, settings)
    if jax.process_count() > 1:  # no process reads DIR before process 0 has created or cleared it
        multihost_utils.sync_global_devices("perflow_evaluate_out_ready")

    mesh = sharding.make_mesh((-1, 1))
    features = inception_features(o.inception, mesh) if o.features == "inception" else digit_features()
    agreement = None
    if o.clip is not None:
        agreement = clip_agreement(o.clip, mesh)
    elif o.features == "digits":
        agreement = digit_agreement()
    spec = fid.FeatureSpec(features.name, size, RESIZE)
    progress_dir = o.out / "progress"
    count = len(prompts)
    total = -(-count // o.batch_size)

    def draw(name: str, sample_options: sample.Options, plan: sample.Plan, seed: int, generator=None):
        """One sampler's measures, resumed from its progress file, and its generator (``generator``'s
        networks with ``plan``'s settings when given, else loaded only if a batch is left to draw)."""
        state = progress_dir / f"{name}.npz"
        first = Progress.load(state, features.dim).batches
        batches = iter(())
        if first < total:
            if generator is None:
                start = time.perf_counter()
                generator = sample.load(sample_options, plan)
                log(f"loaded {plan.description.path} in {time.perf_counter() - start:.1f} s")
            else:
                generator = generator.with_settings(plan.settings)
            batches = generated_batches(generator, prompts, seed, plan.latent_shape, o.batch_size, first)
        return accumulate(name, batches, total, features, agreement, state, _writer(o, name)), generator

    results, generator = {}, None
    for name, (sample_options, plan) in plans.items():
        results[name], generator = draw(name, sample_options, plan, o.seed, generator)
    stats = {}
    for reference in o.references:
        if reference in teachers:  # the teacher's images from other noise than the samplers'
            name = _sampler_name(teachers[reference][1].settings.num_steps, True)
            path = o.out / "references" / f"{name}.npz"
            if not path.is_file():
                reused = generator if o.teacher_ddim else None
                progress = draw(f"reference_{name}", *teachers[reference], o.seed + 1, reused)[0]
                stats[reference] = _save_reference(path, progress.stats, spec)
            else:
                stats[reference] = fid.load_reference(path, spec)
        elif reference.endswith(".npz"):
            stats[reference] = _read_reference(reference, spec)
        else:
            stats[reference] = _reference_stats(reference, o, spec, features, size, log)
    return _report(o, settings, results, stats, features, agreement, log)


def _read_reference(path: str, spec: fid.FeatureSpec) -> fid.Reference:
    """A statistics file, refused unless it exists and was made per ``spec``."""
    if not Path(path).is_file():
        raise EvaluateError(f"--reference {path} does not exist: give a statistics file this command wrote")
    try:
        return fid.load_reference(path, spec)
    except fid.FIDError as error:
        raise EvaluateError(f"--reference {error}") from error


def _save_reference(path: Path, stats: fid.FeatureStats, spec: fid.FeatureSpec) -> fid.Reference:
    """The statistics as a Reference, written to ``path`` by process 0 (every process has the same)."""
    if jax.process_index() != 0:
        return fid.Reference(stats.mean, stats.sigma, stats.count, spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    return fid.save_reference(path, stats, spec)


def _reference_stats(reference: str, o: Options, spec: fid.FeatureSpec, features: Features, size: int, log):
    """An image source's statistics, computed (resumably) once into DIR/references/NAME.npz."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", reference.strip("/")).strip("_")[-80:] or "reference"
    path = o.out / "references" / f"{name}.npz"
    if path.is_file():
        return fid.load_reference(path, spec)
    state = o.out / "progress" / f"reference_{name}.npz"
    first = Progress.load(state, features.dim).batches
    total, batches = reference_images(reference, size, o.batch_size, first)
    progress = accumulate(f"reference_{name}", batches, total, features, None, state)
    skipped = sum(progress.skipped.values())
    if skipped:
        reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(progress.skipped.items()))
        log(f"warning: --reference {reference}: {skipped} images skipped ({reasons})")
    if progress.stats.count < 2:
        raise EvaluateError(f"--reference {reference} gave {progress.stats.count} readable images: FID needs many")
    reference_stats = _save_reference(path, progress.stats, spec)
    log(f"reference {reference}: {progress.stats.count} images, statistics written to {path} (reuse with --reference)")
    return reference_stats


def _report(o, settings, results, stats, features, agreement, log) -> dict[str, Any]:
    """metrics.json: FID per sampler and reference, the agreement, counts, seconds; printed as a table."""
    samplers = {}
    for name, progress in results.items():
        entry = {"images": progress.stats.count, "seconds": round(progress.seconds, 3)}
        entry["images_per_second"] = round(progress.stats.count / progress.seconds, 3) if progress.seconds else None
        entry["fid"] = {}
        for reference, ref in stats.items():
            entry["fid"][reference] = fid.frechet_distance(progress.stats.mean, progress.stats.sigma, ref.mu, ref.sigma)
        if agreement is not None:
            entry[agreement.name] = agreement.final(progress.agreement_sum / progress.stats.count)
        samplers[name] = entry
        scores = ", ".join(f"FID {v:.2f} vs {r}" for r, v in entry["fid"].items())
        extra = f", {agreement.name} {entry[agreement.name]:.4f}" if agreement is not None else ""
        log(f"{name}: {scores}{extra} ({entry['images']} images)")
    metrics = {
        "samplers": samplers,
        "feature_network": features.name,
        "settings": settings,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "versions": _versions(),
        "machine": f"{platform.machine()}, {jax.device_count()} x {jax.devices()[0].device_kind}",
    }
    if jax.process_index() == 0:
        (o.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        log(f"wrote {o.out / 'metrics.json'}")
    return metrics


def _versions() -> dict[str, str]:
    import flax

    import perflow_jax

    return {"perflow_jax": perflow_jax.__version__, "jax": jax.__version__, "flax": flax.__version__}


def _writer(o: Options, name: str) -> Callable[[int, np.ndarray], None]:
    """Writes the first batch's grid DIR/NAME.png and, with --save-images, image j as DIR/images/NAME/j.png."""

    def write(index: int, images: np.ndarray) -> None:
        if index == 0:
            image_io.save_png(image_io.grid(images[:64] / 255.0), o.out / f"{name}.png")
        if o.save_images:
            for k, image in enumerate(images):
                image_io.save_png(image, o.out / "images" / name / f"{index * o.batch_size + k:05d}.png")

    return write


def _sampler_name(steps: int, teacher: bool) -> str:
    return f"teacher_ddim_{steps}" if teacher else f"perflow_{steps}"


def _sample_options(o: Options, steps: int, *, teacher: bool, prompts: Sequence[str], guidance) -> sample.Options:
    """The sample options of one sampler (``guidance`` None: sample's default for the student or the teacher)."""
    return sample.Options(
        model=o.model,
        prompts=prompts,
        steps=None if teacher else steps,
        teacher_ddim=steps if teacher else None,
        guidance=guidance,
        seed=o.seed,
        height=o.height,
        width=o.height,
        weights=None if teacher else o.weights,
        dtype=o.dtype,
    )


def _plan(options: sample.Options) -> sample.Plan:
    try:
        return sample.make_plan(options)
    except sample.SampleError as error:
        raise EvaluateError(str(error)) from error


def _check(o: Options) -> None:
    """The options on their own (no weights read)."""
    if not o.references:
        raise EvaluateError("no --reference: give a statistics .npz, images, or teacher:N")
    if o.num_images < 2:
        raise EvaluateError(f"--num-images {o.num_images}: FID needs at least 2 images (the paper uses 30000)")
    if o.batch_size < 1:
        raise EvaluateError(f"--batch-size {o.batch_size}: give at least 1 (images per jitted call)")
    if not o.steps or min(o.steps) < 1:
        raise EvaluateError(f"--steps {' '.join(map(str, o.steps))}: give one or more step counts, each at least 1")
    if o.features not in FEATURES:
        raise EvaluateError(f"--features {o.features!r}: use one of {', '.join(FEATURES)}")
    if o.features == "inception" and o.inception is None:
        raise EvaluateError(
            f"--inception is missing: FID needs pytorch-fid's Inception weights; download {fid_inception.WEIGHTS_URL} "
            "and pass its path"
        )
    if o.inception is not None and not Path(o.inception).is_file():
        raise EvaluateError(
            f"--inception {o.inception} does not exist: download {fid_inception.WEIGHTS_URL} and pass its path"
        )
    if o.dtype not in COMPUTE_DTYPES:
        raise EvaluateError(f"--dtype {o.dtype!r}: use one of {', '.join(COMPUTE_DTYPES)}")
    if o.num_images < 2048 and o.features == "inception":
        print(
            f"warning: {o.num_images} images give a rank-deficient 2048 x 2048 covariance (FID biased upwards); "
            "the paper's protocol uses 30000",
            file=sys.stderr,
        )


def _settings(o: Options, prompts: Sequence[str], size: int) -> dict[str, Any]:
    """What the results depend on: a resumed run must have the same (settings.json)."""
    fields = dataclasses.asdict(o)
    for transient in ("overwrite", "out"):
        fields.pop(transient)
    fields = {
        k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple | list) else v) for k, v in fields.items()
    }
    digest = hashlib.sha256("\n".join(prompts).encode()).hexdigest()
    return {**fields, "image_size": size, "resize": RESIZE, "prompts_sha256": digest}


def _prepare_out(o: Options, settings: dict[str, Any]) -> None:
    """Creates DIR with settings.json, or checks that a resumed DIR was made with the same settings."""
    path = o.out / "settings.json"
    if path.is_file() and not o.overwrite:
        before = read_json(path)
        if before != settings:
            differ = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
            details = "; ".join(f"{k}: {before.get(k)!r} then, {settings.get(k)!r} now" for k in differ[:4])
            raise OtherSettings(
                f"--out {o.out} holds an evaluation with other settings ({details}): give another --out, or "
                "--overwrite to start it afresh"
            )
        return
    if o.out.exists() and o.overwrite and jax.process_index() == 0:
        for name in ("progress", "references", "images"):
            shutil.rmtree(o.out / name, ignore_errors=True)
        (o.out / "metrics.json").unlink(missing_ok=True)
    if jax.process_index() == 0:
        o.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m perflow_jax.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, metavar="PATH", help="WORKDIR or model folder (or gs:// URL)")
    parser.add_argument(
        "--prompts", type=Path, required=True, metavar="FILE", help="prompts .txt or COCO captions .json"
    )
    parser.add_argument("--reference", nargs="+", required=True, metavar="REF", help="STATS.npz, images or teacher:N")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="the evaluation's folder")
    parser.add_argument("--steps", type=int, nargs="+", default=[4], help="step counts to evaluate (default 4)")
    parser.add_argument("--teacher-ddim", action="store_true", help="evaluate the teacher's DDIM at --steps instead")
    parser.add_argument(
        "--guidance", type=float, help=f"CFG scale (default {sample.STUDENT_GUIDANCE}; DDIM {sample.TEACHER_GUIDANCE})"
    )
    parser.add_argument(
        "--teacher-guidance", type=float, default=sample.TEACHER_GUIDANCE, help="CFG of teacher:N references"
    )
    parser.add_argument("--num-images", type=int, default=30000, help="images per sampler (default 30000)")
    parser.add_argument(
        "--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help=f"images per batch (default {DEFAULT_BATCH_SIZE})"
    )
    parser.add_argument("--seed", type=int, default=0, help="noise seed (default 0; teacher:N references use seed + 1)")
    parser.add_argument("--prompt-seed", type=int, default=0, help="seed of the COCO caption draw (default 0)")
    parser.add_argument(
        "--features", default="inception", choices=list(FEATURES), help="feature network (default inception)"
    )
    parser.add_argument("--inception", type=Path, metavar="FILE", help="pt_inception-2015-12-05-6726825d.pth")
    parser.add_argument("--clip", type=Path, metavar="DIR", help="a transformers CLIP folder, for CLIP score")
    parser.add_argument("--height", type=int, help="image size in pixels, square (default the training resolution)")
    parser.add_argument("--weights", choices=sample.WEIGHTS, help="a WORKDIR's EMA (default) or raw student weights")
    parser.add_argument("--dtype", default="float32", choices=COMPUTE_DTYPES, help="compute dtype (default float32)")
    parser.add_argument("--save-images", action="store_true", help="also write every image as a PNG")
    parser.add_argument("--overwrite", action="store_true", help="start afresh in an --out made with other settings")
    parser.add_argument("--compilation-cache", metavar="DIR", help=compile_cache.FLAG_HELP)
    parser.add_argument("--verbose", action="store_true", help=console.VERBOSE_HELP)
    args = parser.parse_args(argv)
    console.set_log_levels(args.verbose)
    try:
        sharding.initialize_distributed()
        fields = {f.name for f in dataclasses.fields(Options)} - {"references"}
        with compile_cache.cache_in(args.compilation_cache):
            evaluate(Options(references=args.reference, **{k: getattr(args, k) for k in fields}))
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
