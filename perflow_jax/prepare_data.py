"""``python -m perflow_jax.prepare_data``: images and captions -> ArrayRecord shards of VAE latents.

    python -m perflow_jax.prepare_data --model MODEL_DIR --input SRC --out DIR --resolution 512
        [--shard-size 1000] [--batch-size 16] [--latent-dtype float16|float32] [--max-pixels N]
        [--decode-workers N] [--tpu-pod]

MODEL_DIR is a converted folder (``python -m perflow_jax.convert``) or a diffusers folder. SRC is
- a folder of images with captions: a ``.txt`` beside each image, or ``metadata.jsonl`` /
  ``metadata.csv`` with ``file_name`` and ``text`` (or ``caption``) columns;
- webdataset ``.tar`` shards as img2dataset writes them (image + ``.txt`` or ``.json``): a tar
  file, a folder of them, or a glob;
- ``tfds:NAME[:SPLIT]``: a prepared TFDS data set (``--tfds-data-dir``) with an image feature and
  a caption feature (``--caption-field``, default: the first of caption, text);
- ``digits[:SPLIT]``: the demo's handwritten digits (``perflow_jax.demo.digits``, 32x32, captions
  "a handwritten digit seven"), split train (default) or heldout; a folder named digits is ``./digits``.

Each image is resized (shorter side to the resolution) and centre-cropped; its VAE latent
moments, its token ids for each tokenizer and its caption are stored (record schema in
``perflow_jax.data``). Input item i goes to shard i // shard_size, so a run is deterministic:
finished shards (those with a sidecar ``.json``) are kept when an interrupted run is started
again. A resumed run must have the same settings and the same input files (names, sizes and
modification times of a folder's images, captions and metadata, or of the .tar files; recorded in
``INPUT_FILE``). Images are decoded (and resized, cropped) in --decode-workers processes while the
VAE encodes on this host's devices; the shards are the same bytes for any number of workers.

Multi-host (every host of a TPU slice with --tpu-pod, or the PERFLOW_* variables of
``perflow_jax.sharding``): every host runs the same command on the same input and --out (a shared
mount); process p of n prepares the shards s with s % n == p on its own devices, process 0 writes the
settings files and, once every host is done, the manifest listing all shards: one data set.

One bad item never aborts the run: it is skipped and counted by reason (``SKIP_REASONS``):
unreadable or corrupt images, images smaller than --min-size or larger than --max-pixels (PIL's
decompression-bomb guard), no caption, a caption that is not a string, an invalid .json member of
a tar, and the rest of a truncated or unreadable .tar (counted once, named in a warning). Invalid
lines of metadata.jsonl are named in a warning and leave their images without a caption. 16-bit
greyscale images are scaled to 8 bits. A run that keeps no example at all ends in an error.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import glob
import gzip
import hashlib
import io
import itertools
import json
import multiprocessing
import os
import sys
import tarfile
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.experimental import multihost_utils
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from perflow_jax import console, data, pipeline, sharding, weights

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
SKIP_REASONS = (
    "unreadable",
    "corrupt",
    "too_small",
    "too_large",
    "no_caption",
    "bad_caption",
    "bad_metadata",
    "bad_tar",
)
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
MAX_PIXELS = Image.MAX_IMAGE_PIXELS  # PIL's default decompression-bomb limit
STATE_FILE = "prepare_settings.json"
INPUT_FILE = "prepare_inputs.json.gz"  # name -> [size, mtime_ns] of the input files at the start
DECODE_WORKERS = min(16, os.cpu_count() or 1)  # --decode-workers' default (bench/RESULTS.md)


class PrepareError(ValueError):
    """The source, the model or the output folder do not allow the preparation."""


@dataclass(frozen=True)
class Settings:
    """What the shards depend on; saved in ``STATE_FILE``, which a resumed run must match."""

    source: str
    resolution: int
    shard_size: int
    latent_dtype: str
    min_size: int
    model_fingerprint: str
    caption_field: str | None
    max_pixels: int
    input_count: int | None  # input files (None for tfds: and digits)
    input_sha256: str | None  # of their sorted names, sizes and modification times


@dataclass
class Item:
    """One input example: ``open()`` gives the image (may raise; picklable, for the decode workers);
    ``caption`` may be None or not a string; ``skip``, a skip reason known without opening it."""

    key: str
    open: Callable[[], Image.Image]
    caption: Any
    skip: str | None = None


# ---------------------------------------------------------------------------------------------
# Sources


def open_source(spec: str, *, tfds_data_dir: str | None = None, caption_field: str | None = None):
    """(number of items or None, iterator of Items) for a source spec, in a deterministic order."""
    if spec.startswith("tfds:"):
        return _tfds_source(spec[len("tfds:") :], tfds_data_dir, caption_field)
    if spec == "digits" or spec.startswith("digits:"):
        return _digits_source(spec.partition(":")[2] or "train")
    path = Path(spec)
    tars = _tar_paths(spec)
    if path.is_dir() and not tars:
        items = _folder_items(path)
        return len(items), iter(items)
    missing = [t for t in tars if not t.is_file()]
    if not tars or missing:
        raise PrepareError(
            f"input {spec!r} is neither a folder of images, nor webdataset .tar files, nor tfds:NAME[:SPLIT]"
        )
    return None, _webdataset_items(tars)


def _tar_paths(spec: str) -> list[Path]:
    path = Path(spec)
    return sorted(path.glob("*.tar")) if path.is_dir() else [Path(p) for p in sorted(glob.glob(spec))] or [path]


def input_files(spec: str) -> dict[str, list[int]] | None:
    """name -> [size, mtime_ns] of every file a folder or .tar source reads; None for tfds: and digits."""
    if spec.startswith("tfds:") or spec == "digits" or spec.startswith("digits:"):
        return None
    path = Path(spec)
    if path.is_dir() and not _tar_paths(spec):
        wanted = (*IMAGE_SUFFIXES, ".txt")
        files = {
            p.relative_to(path).as_posix(): p
            for p in path.rglob("*")
            if (p.suffix.lower() in wanted or p.name in METADATA_FILES) and p.is_file()
        }
    else:
        files = {str(p): p for p in _tar_paths(spec)}
    return {name: [(stat := file.stat()).st_size, stat.st_mtime_ns] for name, file in sorted(files.items())}


def _folder_items(folder: Path) -> list[Item]:
    captions = _folder_captions(folder)
    items = []
    for file in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        relative = file.relative_to(folder).as_posix()
        caption = captions.get(relative) if captions is not None else _read_text(file.with_suffix(".txt"))
        items.append(Item(relative, functools.partial(Image.open, file), caption))
    if not items:
        raise PrepareError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return items


def _folder_captions(folder: Path) -> dict[str, Any] | None:
    """file_name -> caption from metadata.jsonl or metadata.csv; None when there is neither.

    Read as the .txt captions are (bytes that are not UTF-8 replaced); a line of metadata.jsonl that
    is not a JSON object is named in a warning and skipped.
    """
    if (folder / "metadata.jsonl").is_file():
        rows, bad = [], []
        lines = (folder / "metadata.jsonl").read_text(errors="replace").splitlines()
        for number, line in enumerate(lines, 1):
            try:
                row = json.loads(line) if line.strip() else {}
            except json.JSONDecodeError:
                row = None
            if isinstance(row, dict):
                rows.append(row)
            else:
                bad.append(number)
        if bad:
            _warn(
                f"{folder / 'metadata.jsonl'}: {len(bad)} lines are not JSON objects (line "
                f"{', '.join(map(str, bad[:5]))}{', ...' if len(bad) > 5 else ''}); their images have no caption"
            )
    elif (folder / "metadata.csv").is_file():
        with open(folder / "metadata.csv", newline="", errors="replace") as f:
            rows = list(csv.DictReader(f))
    else:
        return None
    return {row["file_name"]: row.get("text", row.get("caption")) for row in rows if "file_name" in row}


def _warn(message: str) -> None:
    tqdm.write(f"warning: {message}", file=sys.stderr)


def _read_text(path: Path) -> str | None:
    return path.read_text(errors="replace").strip() if path.is_file() else None


def _webdataset_items(tars: list[Path]) -> Iterator[Item]:
    """Items of webdataset tars: members grouped by key (the name up to the first dot).

    A tar that cannot be read (not a tar, or truncated) gives the items before the damage, then one
    item skipped as bad_tar, and a warning naming it.
    """
    for tar_path in tars:
        try:
            with tarfile.open(tar_path) as tar:
                files = (member for member in tar if member.isfile())
                for key, members in itertools.groupby(files, lambda member: _split_member(member.name)[0]):
                    group = {_split_member(m.name)[1]: tar.extractfile(m).read() for m in members}
                    yield _webdataset_item(tar_path, key, group)
                _require_end_of_archive(tar_path, tar.offset)
        except (tarfile.TarError, OSError, EOFError) as error:
            _warn(f"{tar_path}: not a readable tar ({error}); skipped the rest of it")
            yield Item(tar_path.name, _unreadable, None, skip="bad_tar")


def _require_end_of_archive(tar_path: Path, offset: int) -> None:
    """Raise ReadError unless the tar's end-of-archive zeros follow its last member: tarfile ends a tar
    cut inside a member header without a word."""
    with open(tar_path, "rb") as f:
        f.seek(offset)
        if f.read(1 << 20).strip(b"\0"):
            raise tarfile.ReadError(f"truncated or damaged after byte {offset}")


def _unreadable() -> Image.Image:
    raise UnidentifiedImageError("skipped before opening")


def _split_member(name: str) -> tuple[str, str]:
    """A tar member's name -> (key: the name up to the first dot of its base name, extension in lower case)."""
    directory, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), extension.lower()


def _webdataset_item(tar_path: Path, key: str, group: dict[str, bytes]) -> Item:
    image_bytes = next((group[ext[1:]] for ext in IMAGE_SUFFIXES if ext[1:] in group), None)
    caption = group["txt"].decode(errors="replace").strip() if "txt" in group else None
    skip = None
    if caption is None and "json" in group:
        try:
            meta = json.loads(group["json"].decode(errors="replace"))
            caption = meta.get("caption") or meta.get("text")
        except (json.JSONDecodeError, AttributeError):  # not JSON, or JSON but not an object
            skip = "bad_metadata"

    return Item(f"{tar_path.name}/{key}", functools.partial(_open_bytes, key, image_bytes), caption, skip)


def _open_bytes(key: str, image_bytes: bytes | None) -> Image.Image:
    if image_bytes is None:
        raise UnidentifiedImageError(f"no image member for {key}")
    return Image.open(io.BytesIO(image_bytes))


def _tfds_source(name_split: str, data_dir: str | None, caption_field: str | None):
    import tensorflow_datasets as tfds

    name, _, split = name_split.partition(":")
    try:
        source = tfds.data_source(name, split=split or "train", data_dir=data_dir)
    except Exception as error:  # tfds raises several kinds for a missing or unprepared data set
        raise PrepareError(
            f"cannot open TFDS data set {name_split!r} ({error}); is it prepared in --tfds-data-dir?"
        ) from error
    features = set(source.dataset_info.features.keys())
    field = caption_field or next((f for f in ("caption", "text") if f in features), None)
    if field not in features or "image" not in features:
        raise PrepareError(
            f"TFDS data set {name} has features {sorted(features)}: it needs 'image' and a caption feature "
            "(choose it with --caption-field)"
        )

    def items():
        for index in range(len(source)):
            example = source[index]
            caption = example[field]
            caption = caption.decode() if isinstance(caption, bytes) else str(caption)
            pixels = example["image"]
            pixels = pixels[..., 0] if pixels.ndim == 3 and pixels.shape[-1] == 1 else pixels  # grey images
            yield Item(f"{name_split}/{index}", functools.partial(Image.fromarray, pixels), caption)

    return len(source), items()


def _digits_source(split: str):
    from perflow_jax.demo import digits

    try:
        images, labels = digits.load(split)
    except ValueError as error:
        raise PrepareError(f"input digits:{split}: {error}") from error
    items = [
        Item(f"digits:{split}/{index}", functools.partial(Image.fromarray, pixels), digits.caption(label))
        for index, (pixels, label) in enumerate(zip(images, labels, strict=True))
    ]
    return len(items), iter(items)


# ---------------------------------------------------------------------------------------------
# One example


def center_crop(image: Image.Image, resolution: int) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
    """Shorter side resized to ``resolution`` (bicubic), then the centre square cut out.

    16-bit greyscale (modes I;16* and I, 0..65535) is scaled to 0..255 first.
    Returns (pixels [R, R, 3] float32 in [-1, 1], original (height, width), crop (top, left)).
    """
    if image.mode.startswith("I;16") or image.mode == "I":
        grey = np.asarray(image, np.float64) * (255 / 65535)
        image = Image.fromarray(np.clip(np.round(grey), 0, 255).astype(np.uint8))
    width, height = image.size
    scale = resolution / min(width, height)
    new_w, new_h = max(resolution, round(width * scale)), max(resolution, round(height * scale))
    resized = image.convert("RGB").resize((new_w, new_h), Image.BICUBIC)
    top, left = int(round((new_h - resolution) / 2.0)), int(round((new_w - resolution) / 2.0))
    crop = resized.crop((left, top, left + resolution, top + resolution))
    pixels = np.asarray(crop, np.float32) / 127.5 - 1.0
    return pixels, (height, width), (top, left)


Loaded = tuple[dict[str, Any] | None, str | None]  # an example without latents and ids, or a skip reason


def load_item(item: Item, resolution: int, min_size: int, max_pixels: int) -> Loaded:
    """(example without latents and ids, None) or (None, skip reason)."""
    if item.skip:
        return None, item.skip
    if item.caption is not None and not isinstance(item.caption, str):
        return None, "bad_caption"
    if not item.caption or not item.caption.strip():
        return None, "no_caption"
    image, reason = read_image(item, max_pixels)
    if reason:
        return None, reason
    if min(image.size) < min_size:
        return None, "too_small"
    pixels, original_size, crop = center_crop(image, resolution)
    example = dict(key=item.key, caption=item.caption.strip(), pixels=pixels)
    example.update(original_size=np.asarray(original_size, np.int32), crop_top_left=np.asarray(crop, np.int32))
    return example, None


def read_image(item: Item, max_pixels: int) -> tuple[Image.Image | None, str | None]:
    """(the item's decoded image, None) or (None, skip reason); ``max_pixels`` is PIL's
    decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``) meanwhile, and going over it is too_large."""
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                image = item.open()
            except (UnidentifiedImageError, OSError, ValueError):
                return None, "unreadable"
            if image.width * image.height > max_pixels:  # decoded arrays (tfds:, digits) that PIL did not check
                return None, "too_large"
            try:
                image.load()  # some formats (GIF frames) check the limit again here
            except (OSError, ValueError, SyntaxError):
                return None, "corrupt"
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        return None, "too_large"
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    return image, None


Decode = Callable[[list[Item]], Iterator[Loaded]]


@contextlib.contextmanager
def decoder(workers: int, resolution: int, min_size: int, max_pixels: int) -> Iterator[Decode]:
    """A function: items -> their `load_item` results, in order, decoded in this process (``workers``
    0) or in that many worker processes (spawned: JAX's threads do not survive a fork).

    The results are the same either way; a worker process that dies (killed, out of memory) ends
    the run in a PrepareError, and the workers end when this process does, even when it is killed.
    """
    load = functools.partial(load_item, resolution=resolution, min_size=min_size, max_pixels=max_pixels)
    if not workers:
        yield lambda items: map(load, items)
        return
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(workers, context, initializer=_exit_with_parent, initargs=(os.getpid(),))

    def decode(items):
        try:
            yield from pool.map(load, items)
        except BrokenProcessPool as error:
            raise PrepareError(
                f"a decode worker process died ({error}): run again to resume, with fewer --decode-workers if "
                "memory is short, or --decode-workers 0 to decode in this process"
            ) from None

    try:
        yield decode
    finally:
        pool.shutdown(cancel_futures=True)


def _exit_with_parent(parent: int) -> None:
    """A decode worker's start: a thread that ends the worker once ``parent`` (its starter) is gone."""

    def watch():
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


# ---------------------------------------------------------------------------------------------
# The model side: VAE encoder and tokenizers


class Encoder:
    """The VAE encoder (jitted, the batch spread over local devices) and the model's tokenizers."""

    def __init__(self, model_dir: str | os.PathLike, batch_size: int):
        model_dir = epath.Path(model_dir)  # a converted folder may be a gs:// URL
        try:
            self.model = pipeline.load_model(model_dir, networks=("vae",))
        except weights.WeightsFileError as error:
            raise PrepareError(f"--model: {error}") from error
        if "input_ids" not in self.model.tokenizers:
            raise PrepareError(f"{model_dir} has no tokenizer/ folder: convert the whole diffusers pipeline")
        self.vae = self.model.module("vae")
        self.downsampling_factor = self.vae.config.downsampling_factor
        self.params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), self.model.params["vae"])
        mesh = sharding.make_mesh((-1, 1), jax.local_devices())
        self.batch_size = -(-batch_size // mesh.size) * mesh.size
        self._encode = jax.jit(
            lambda p, x: self.vae.apply({"params": p}, x, method="encode"),
            in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)),
            out_shardings=sharding.batch_sharding(mesh),
        )
        self.fingerprint = data.model_fingerprint(self.model.configs["vae"], self.model.params["vae"], model_dir)

    def moments(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[N, R, R, 3] in [-1, 1] -> (mean, logvar) [N, h, w, c] float32, in fixed-size batches."""
        batches = []
        for start in range(0, len(pixels), self.batch_size):
            chunk = pixels[start : start + self.batch_size]
            padded = np.concatenate([chunk, np.zeros((self.batch_size - len(chunk),) + chunk.shape[1:], chunk.dtype)])
            batches.append([np.asarray(moment)[: len(chunk)] for moment in self._encode(self.params, padded)])
        mean, logvar = (np.concatenate(moment) for moment in zip(*batches, strict=True))
        return mean, logvar


# ---------------------------------------------------------------------------------------------
# The run


def prepare(
    model: str | os.PathLike,
    source: str,
    out: Path,
    *,
    resolution: int,
    shard_size: int = 1000,
    batch_size: int = 16,
    latent_dtype: str = "float16",
    min_size: int | None = None,
    max_pixels: int = MAX_PIXELS,
    tfds_data_dir: str | None = None,
    caption_field: str | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    decode_workers: int = 0,
    max_items: int | None = None,
    progress: bool = True,
) -> dict[str, Any] | None:
    """Prepare (or resume preparing) ``out``; returns the manifest once every shard is finished.

    In a multi-host run (``jax.distributed``) every process calls it with the same arguments and
    writes its own shards; process 0 starts ``out`` and writes the manifest, which every process
    returns. ``decode_workers`` > 0 decodes the images in that many worker processes (`decoder`).
    ``max_items`` stops after that many input items (a run that is interrupted on purpose; one process).
    ``max_pixels`` replaces PIL's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``) while an image is read.
    """
    out = Path(out)
    weights.check_out(out, {"--input": source, "--model": model}, PrepareError)
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if latent_dtype not in ("float16", "float32"):
        raise PrepareError(f"--latent-dtype {latent_dtype!r}: use float16 or float32")
    min_size = resolution // 2 if min_size is None else min_size
    encoder = Encoder(model, batch_size)
    if resolution % encoder.downsampling_factor:
        raise PrepareError(
            f"--resolution {resolution} is not a multiple of {encoder.downsampling_factor}, "
            "the VAE's downsampling factor"
        )
    total, items = open_source(source, tfds_data_dir=tfds_data_dir, caption_field=caption_field)
    files = input_files(source)
    input_sha256 = None if files is None else hashlib.sha256(json.dumps(files).encode()).hexdigest()[:16]
    settings = Settings(
        source=source,
        resolution=resolution,
        shard_size=shard_size,
        latent_dtype=latent_dtype,
        min_size=min_size,
        model_fingerprint=encoder.fingerprint,
        caption_field=caption_field,
        max_pixels=max_pixels,
        input_count=None if files is None else len(files),
        input_sha256=input_sha256,
    )
    _start(out, settings, files)

    start = time.perf_counter()
    bar = tqdm(total=total, unit="item", desc="preparing", disable=not progress, dynamic_ncols=True)
    skipped: Counter = Counter()
    written = shards_written = 0
    num_items = 0
    with decoder(decode_workers, resolution, min_size, max_pixels) as decode:
        for shard, chunk in enumerate(chunks(items, shard_size)):
            num_items += len(chunk)
            bar.update(len(chunk))
            if shard % process_count != process_index or _sidecar(out, shard).is_file():
                continue
            if max_items is not None and num_items > max_items:
                bar.close()
                return None
            stats = _write_shard(out, shard, decode(chunk), encoder, settings)
            skipped.update(stats["skipped"])
            written += stats["count"]
            shards_written += 1
            bar.set_postfix(written=written, skipped=sum(skipped.values()))
    bar.close()
    if jax.process_count() > 1:
        print(f"process {process_index} of {process_count} wrote {shards_written} shards")
    _sync("perflow_prepare_shards_written")
    manifest = _finish(out, settings, num_items, encoder) if jax.process_index() == 0 else None
    _sync("perflow_prepare_manifest_written")
    if jax.process_index() != 0:
        manifest = data.read_manifest(out)
    elapsed = time.perf_counter() - start
    if manifest is not None:
        if not manifest["count"]:
            raise PrepareError(
                f"{out}: no examples ({data.skip_summary(manifest)}): check --input, --min-size and --max-pixels"
            )
        skips = ", ".join(f"{n} {reason}" for reason, n in manifest["skipped"].items() if n) or "none"
        print(
            f"prepared {manifest['count']} examples from {manifest['input_items']} items in "
            f"{len(manifest['shards'])} shards at {resolution} px ({elapsed:.1f} s); skipped: {skips}; -> {out}"
        )
    return manifest


def _start(out: Path, settings: Settings, files: dict[str, list[int]] | None) -> None:
    """Start ``out`` (its ``STATE_FILE`` and ``INPUT_FILE``, written by process 0), or check that an
    ``out`` already started has the same settings and input files (every process); leftover
    ``.partial`` files of an interrupted run are removed."""
    new = _check_settings(out, settings, files)
    _sync("perflow_prepare_checked")  # every process has looked at out before process 0 writes in it
    if jax.process_index() == 0:
        if new:
            out.mkdir(parents=True, exist_ok=True)
            (out / STATE_FILE).write_text(json.dumps(asdict(settings), indent=2) + "\n")
            if files is not None:
                (out / INPUT_FILE).write_bytes(gzip.compress(json.dumps(files).encode()))
        for partial in out.glob("*.partial"):
            partial.unlink()
    _sync("perflow_prepare_started")
    if new and jax.process_index() != 0:  # process 0's settings and input files: the same as this host's?
        _check_settings(out, settings, files)


def _sync(name: str) -> None:
    """Wait until every process of a multi-host run gets here (a no-op in one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _check_settings(out: Path, settings: Settings, files: dict[str, list[int]] | None) -> bool:
    """True if ``out`` is to be started (it is empty or absent); False if it was started with the same
    settings and input files; else a PrepareError."""
    now = asdict(settings)
    state = out / STATE_FILE
    if not state.is_file():
        weights.require_empty(out, PrepareError, "it is not a prepared data folder; choose another --out")
        return True
    before = weights.read_json(state)
    changed = {k: (before.get(k), v) for k, v in now.items() if before.get(k) != v and not k.startswith("input_")}
    if changed:
        details = "; ".join(f"{k}: {old!r} then, {new!r} now" for k, (old, new) in changed.items())
        raise PrepareError(f"{out} was prepared with other settings ({details}): use another --out to start afresh")
    if "input_sha256" in before and before["input_sha256"] != settings.input_sha256:  # older runs have none
        _refuse_changed_input(out, files)
    return False


def _refuse_changed_input(out: Path, files: dict[str, list[int]] | None) -> None:
    """Raise a PrepareError naming the input files added, removed and modified since ``out`` was started."""
    before = json.loads(gzip.decompress((out / INPUT_FILE).read_bytes())) if (out / INPUT_FILE).is_file() else {}
    files = files or {}
    changes = {
        "added": sorted(set(files) - set(before)),
        "removed": sorted(set(before) - set(files)),
        "modified": sorted(name for name in set(files) & set(before) if files[name] != before[name]),
    }
    details = "; ".join(
        f"{len(names)} {kind} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
        for kind, names in changes.items()
        if names
    )
    hosts = " (on a pod every host must see the same input files)" if jax.process_count() > 1 else ""
    raise PrepareError(
        f"the input changed since {out} was started ({details}){hosts}: restore the input as it was, or use "
        "another --out to start afresh"
    )


def chunks(items: Iterator[Item], size: int) -> Iterator[list[Item]]:
    while chunk := list(itertools.islice(items, size)):
        yield chunk


def _shard_file(out: Path, shard: int) -> Path:
    return out / f"shard-{shard:05d}{data.SHARD_SUFFIX}"


def _sidecar(out: Path, shard: int) -> Path:
    return out / f"shard-{shard:05d}.json"


def _write_shard(
    out: Path, shard: int, loaded: Iterator[Loaded], encoder: Encoder, settings: Settings
) -> dict[str, Any]:
    """Encode one shard's items (``loaded``: their `load_item` results) a VAE batch at a time, as they
    are decoded, and write the shard, then its sidecar (the mark of a finished shard)."""
    records, batch, skipped, input_items = [], [], Counter(), 0
    for example, reason in loaded:
        input_items += 1
        if reason:
            skipped[reason] += 1
        else:
            batch.append(example)
        if len(batch) == encoder.batch_size:
            records += _encode(batch, encoder, settings)
            batch = []
    records += _encode(batch, encoder, settings) if batch else []
    partial = _shard_file(out, shard).with_name(_shard_file(out, shard).name + ".partial")
    data.write_shard(partial, records)
    partial.replace(_shard_file(out, shard))
    stats = {
        "file": _shard_file(out, shard).name,
        "count": len(records),
        "input_items": input_items,
        "skipped": {reason: skipped[reason] for reason in SKIP_REASONS},
    }
    sidecar = _sidecar(out, shard)
    sidecar.with_suffix(".json.partial").write_text(json.dumps(stats) + "\n")
    sidecar.with_suffix(".json.partial").replace(sidecar)
    return stats


def _encode(examples: list[dict[str, Any]], encoder: Encoder, settings: Settings) -> list[bytes]:
    """Records of decoded examples: their VAE moments and token ids added."""
    mean, logvar = encoder.moments(np.stack([e.pop("pixels") for e in examples]))
    ids = encoder.model.tokenize([e["caption"] for e in examples])  # input_ids (input_ids_2): [N, 77] int32
    for i, example in enumerate(examples):
        example.update(mean=mean[i].astype(settings.latent_dtype), logvar=logvar[i].astype(settings.latent_dtype))
        example.update({field: values[i] for field, values in ids.items()})
    return [data.encode_record(example) for example in examples]


def _finish(out: Path, settings: Settings, num_items: int, encoder: Encoder) -> dict[str, Any] | None:
    """Write manifest.json once every shard of every process is finished; else None."""
    num_shards = -(-num_items // settings.shard_size)
    sidecars = [_sidecar(out, shard) for shard in range(num_shards)]
    if not all(s.is_file() for s in sidecars):
        return None
    shards = [weights.read_json(s) for s in sidecars]
    latent_size = settings.resolution // encoder.downsampling_factor
    manifest = {
        **asdict(settings),
        "count": sum(s["count"] for s in shards),
        "input_items": num_items,
        "skipped": {reason: sum(s["skipped"].get(reason, 0) for s in shards) for reason in SKIP_REASONS},
        "latent_shape": [latent_size, latent_size, encoder.vae.config.latent_channels],
        "scaling_factor": encoder.vae.config.scaling_factor,
        "tokenizers": sorted(encoder.model.tokenizers),
        "shards": [{"file": s["file"], "count": s["count"]} for s in shards if s["count"]],
    }
    data.write_manifest(out, manifest)
    return data.read_manifest(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m perflow_jax.prepare_data",
        description="Encode images and captions into ArrayRecord shards of VAE latents and token ids.",
    )
    parser.add_argument("--model", required=True, help="converted (local or gs://) or diffusers model folder")
    parser.add_argument("--input", required=True, help="image folder, webdataset .tar(s), tfds:NAME[:SPLIT], digits")
    parser.add_argument("--out", type=Path, required=True, help="output folder (resumed if it holds a started run)")
    parser.add_argument("--resolution", type=_positive, required=True, help="square crop size in pixels, e.g. 512")
    parser.add_argument("--shard-size", type=_positive, default=1000, help="input items per shard (default 1000)")
    parser.add_argument("--batch-size", type=_positive, default=16, help="images per VAE call (default 16)")
    parser.add_argument("--latent-dtype", default="float16", choices=("float16", "float32"), help="latents' dtype")
    parser.add_argument(
        "--min-size", type=_positive, help="skip images whose shorter side is smaller (default resolution/2)"
    )
    parser.add_argument(
        "--max-pixels",
        type=_positive,
        default=MAX_PIXELS,
        help=f"skip images of more pixels as too_large (default {MAX_PIXELS}, PIL's limit)",
    )
    parser.add_argument("--tfds-data-dir", help="data_dir of a tfds: source")
    parser.add_argument("--caption-field", help="caption feature of a tfds: source (default caption or text)")
    parser.add_argument(
        "--decode-workers",
        type=_non_negative,
        default=DECODE_WORKERS,
        help=f"processes that decode images; 0: in this process (default {DECODE_WORKERS}: the CPUs, at most 16)",
    )
    parser.add_argument(
        "--tpu-pod", action="store_true", help="every host of a TPU slice runs this: join them (jax.distributed)"
    )
    parser.add_argument("--verbose", action="store_true", help=console.VERBOSE_HELP)
    args = vars(parser.parse_args(argv))  # the other flags are prepare's keyword arguments
    console.set_log_levels(args.pop("verbose"))
    try:
        sharding.initialize_distributed(args.pop("tpu_pod"))
        manifest = prepare(args.pop("model"), args.pop("input"), args.pop("out"), **args)
    except ValueError as error:  # PrepareError, weights' file errors, half-set PERFLOW_* variables (sharding)
        print(f"error: {error}", file=sys.stderr)
        return 2
    if manifest is None:
        print("this process's shards are done; the manifest is written when every process has finished")
    return 0


def _positive(text: str) -> int:
    """An argparse type: a whole number above 0."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number above 0")
    return value


def _non_negative(text: str) -> int:
    """An argparse type: a whole number, 0 or more."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of 0 or more")
    return value


if __name__ == "__main__":
    sys.exit(main())
