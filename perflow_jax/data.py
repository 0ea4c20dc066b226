"""Prepared training data: the record schema of the ArrayRecord shards, and the grain input pipeline.

``python -m perflow_jax.prepare_data`` writes DIR/ with one ArrayRecord file per shard, a JSON
sidecar per finished shard and ``manifest.json``. Each record is one example, a msgpack map:

Record schema, version 1 (``SCHEMA_VERSION``):

| key            | type                       | meaning                                               |
|----------------|----------------------------|-------------------------------------------------------|
| key            | str                        | where the example came from (file, tar member, index) |
| caption        | str                        | the caption                                           |
| mean, logvar   | [h, w, c] float16/float32  | VAE posterior moments of the cropped image            |
| input_ids      | [77] int32                 | token ids of the caption, tokenizer/ (padded, BOS/EOS) |
| input_ids_2    | [77] int32                 | the same for tokenizer_2/ (SDXL only)                 |
| original_size  | [2] int32                  | (height, width) of the source image                   |
| crop_top_left  | [2] int32                  | (top, left) of the crop in the resized image          |

Training latents are ``(mean + exp(logvar / 2) * noise) * scaling_factor``. A new field or a
changed meaning bumps ``SCHEMA_VERSION``; readers refuse versions they do not know.

The manifest's ``model_fingerprint`` (``model_fingerprint``) names the VAE and tokenizers the data
was encoded with; ``check_for_training`` refuses data of another model, or without examples.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
from etils import epath
from flax import serialization

from perflow_jax import weights

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
SHARD_SUFFIX = ".array_record"
ARRAY_FIELDS = ("mean", "logvar", "input_ids", "input_ids_2", "original_size", "crop_top_left")
TEXT_FIELDS = ("key", "caption")


def encode_record(example: dict[str, Any]) -> bytes:
    """One example (the schema's fields; input_ids_2 optional) -> record bytes."""
    unknown = set(example) - set(ARRAY_FIELDS) - set(TEXT_FIELDS)
    if unknown:
        raise ValueError(f"fields {sorted(unknown)} are not in record schema {SCHEMA_VERSION}")
    return serialization.msgpack_serialize(
        {k: (np.asarray(v) if k in ARRAY_FIELDS else str(v)) for k, v in example.items()}
    )


def decode_record(record: bytes) -> dict[str, Any]:
    """Record bytes -> the example as numpy arrays and strings."""
    return dict(serialization.msgpack_restore(record))


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of a prepared data folder, checked for a schema version this code reads."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder} has no {MANIFEST}: prepare the data first with python -m perflow_jax.prepare_data "
            f"(an interrupted preparation resumes when run again with the same arguments)"
        )
    manifest = weights.read_json(path)
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(
            f"{folder} holds records of schema version {manifest.get('schema_version')}, but this code reads "
            f"version {SCHEMA_VERSION}: prepare the data again with this version of perflow_jax"
        )
    return manifest


def shard_paths(folder: Path) -> list[Path]:
    """The finished shard files of a prepared data folder, in order; a folder without examples is refused."""
    manifest = read_manifest(folder)
    _require_examples(folder, manifest)
    return [Path(folder) / shard["file"] for shard in manifest["shards"]]


def _require_examples(folder: Path, manifest: dict[str, Any]) -> None:
    if not manifest["shards"]:
        raise ValueError(
            f"{folder} has no examples ({skip_summary(manifest)}): prepare it again from other input, "
            "or with a lower --min-size"
        )


def skip_summary(manifest: dict[str, Any]) -> str:
    """'every item was skipped: 3 unreadable, 1 no_caption' (or 'the input has no items') for a manifest."""
    skips = ", ".join(f"{n} {reason}" for reason, n in manifest.get("skipped", {}).items() if n)
    return f"every item was skipped: {skips}" if skips else "the input has no items"


def model_fingerprint(vae_config: dict, params: Any, model_dir: Path) -> str:
    """sha256 over the VAE config and weights and the tokenizer files: prepared data belongs to one model."""
    model_dir = epath.Path(model_dir)
    config = {k: v for k, v in vae_config.items() if not k.startswith("_")}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for key, value in sorted(weights.flatten(params).items()):
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(np.asarray(value, np.float32)).tobytes())
    for folder in ("tokenizer", "tokenizer_2"):
        for file in sorted((model_dir / folder).glob("*")) if (model_dir / folder).is_dir() else ():
            digest.update(file.name.encode() + file.read_bytes())
    return digest.hexdigest()[:16]


def check_for_training(folder: Path, manifest: dict[str, Any], fingerprint: str, allow_other_vae: bool) -> None:
    """Refuse prepared data without examples, or encoded with another VAE or tokenizers than the
    training model's (its ``model_fingerprint``), unless ``allow_other_vae`` (config.data.allow_other_vae)."""
    _require_examples(folder, manifest)
    prepared = manifest.get("model_fingerprint", fingerprint)
    if prepared != fingerprint and not allow_other_vae:
        raise ValueError(
            f"the data at {folder} was prepared with another VAE or tokenizer (model fingerprint {prepared}) than "
            f"the model's ({fingerprint}): prepare it again with prepare_data --model set to config.model.path, "
            "or set --config.data.allow_other_vae=True to train on it anyway"
        )


def write_shard(path: Path, records: list[bytes]) -> None:
    """Write one ArrayRecord shard (one record per group, for random access by grain)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    writer = ArrayRecordWriter(str(path), "group_size:1")
    try:
        for record in records:
            writer.write(record)
    finally:
        writer.close()


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Write ``manifest.json`` (schema_version set) atomically: a reader never sees half of it."""
    path = Path(folder) / MANIFEST
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps({**manifest, "schema_version": SCHEMA_VERSION}, indent=2) + "\n")
    partial.replace(path)


# ---------------------------------------------------------------------------------------------
# The grain input pipeline
#
# One host (JAX process) reads its own contiguous 1/process_count of the examples, shuffled within
# that slice each epoch, and batches them; `perflow_jax.sharding.global_batch` puts the hosts'
# batches together into arrays sharded over the mesh.


OPTIONAL_FIELDS = ("input_ids_2",)  # kept where the records have it (SDXL data), else left out


@dataclasses.dataclass(frozen=True)
class DecodeRecord(grain.transforms.Map):
    """Record bytes -> {field: numpy array} holding only ``fields`` (text fields as 0-d str arrays)."""

    fields: tuple[str, ...]

    def map(self, record: bytes) -> dict[str, np.ndarray]:
        example = decode_record(record)
        return {k: np.asarray(example[k]) for k in self.fields}


def create_iterator(
    folder: Path,
    *,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    fields: Sequence[str] = ARRAY_FIELDS,
    worker_count: int = 0,
) -> grain.DataLoaderIterator:
    """An iterator of this process's batches from a prepared data folder.

    Each batch is ``{field: [batch_size, ...] array}`` with the dtypes of the records (mean, logvar:
    [batch_size, h, w, c] float16/float32; input_ids, input_ids_2: [batch_size, 77] int32; text
    fields: [batch_size] str). ``batch_size`` is the per-process batch: the global batch of a step is
    batch_size x process_count (see `perflow_jax.sharding.global_batch`). Process p of n reads the
    examples [p * N // n, (p + 1) * N // n) of the folder's N, so every process sees N // n examples
    per epoch (the last N % n are never read); ``seed`` reshuffles them each epoch, the same way on
    every run.
    ``num_epochs=None`` repeats forever (batches run across epoch boundaries); a last partial batch
    is dropped. ``worker_count`` > 0 decodes in that many child processes.

    The iterator's position (``get_state``/``set_state``) restores only into an iterator made with
    the same arguments (grain refuses another folder path, seed, process or worker count);
    ``perflow_jax.checkpoint`` saves it as ``data/process_{p}-of-{n}.json`` beside the model state.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    source = grain.sources.ArrayRecordDataSource([str(path) for path in shard_paths(folder)])

    present = decode_record(source[0]).keys()
    missing = [f for f in fields if f not in present and f not in OPTIONAL_FIELDS]
    if missing:
        raise ValueError(
            f"the records in {folder} have no field {', '.join(map(repr, missing))}; they hold "
            f"{', '.join(sorted(present))}: ask for those, or prepare the data again with the missing fields"
        )
    per_process = len(source) // process_count
    if batch_size > per_process:
        raise ValueError(
            f"per-process batch {batch_size} is larger than the {per_process} examples each of {process_count} "
            f"processes reads from {folder} ({len(source)} examples): use a per-process batch of at most "
            f"{per_process}, or prepare more data"
        )

    shard_options = grain.sharding.ShardOptions(process_index, process_count, drop_remainder=True)
    sampler = grain.samplers.IndexSampler(
        num_records=len(source), shard_options=shard_options, shuffle=shuffle, num_epochs=num_epochs, seed=seed
    )
    loader = grain.DataLoader(
        data_source=source,
        sampler=sampler,
        operations=[
            DecodeRecord(tuple(f for f in fields if f in present)),
            grain.transforms.Batch(batch_size=batch_size, drop_remainder=True),
        ],
        worker_count=worker_count,
        shard_options=shard_options,
    )
    return iter(loader)
