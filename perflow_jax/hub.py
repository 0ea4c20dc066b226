"""The Hugging Face Hub: a pipeline's files downloaded for ``convert --from ORG/NAME[@REVISION]``.

Downloads go through ``huggingface_hub.snapshot_download`` into its cache, so HF_HOME /
HF_HUB_CACHE, HF_HUB_OFFLINE and the token (``hf auth login`` or HF_TOKEN) apply as they do for
diffusers. Only what conversion reads is fetched: model_index.json, the networks' configs, the
tokenizers, the scheduler config and one weight variant per network (safetensors; ``.bin`` only
for a network that has no safetensors of that variant).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import huggingface_hub
from huggingface_hub import errors

from perflow_jax import weights

# ORG/NAME with an optional @REVISION (a branch, tag or commit).
HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>\S+))?")


def is_hub_id(source: str | Path) -> bool:
    """True for a ``--from`` that is no existing local path but reads as ORG/NAME[@REVISION]."""
    return not Path(source).exists() and HUB_ID.fullmatch(str(source)) is not None


def download_pipeline(
    spec: str, variant: str | None, error: type[Exception], log: Callable[[str], Any] = print
) -> tuple[Path, str]:
    """Download (or find in the cache) what converting hub pipeline ``spec`` needs.

    Returns (the snapshot folder, "ORG/NAME@commit"). Hub failures (unknown or gated repository,
    unknown revision, offline and not cached) raise ``error`` with one line saying what to do.
    """
    match = HUB_ID.fullmatch(spec)
    repo_id, revision = match["repo"], match["revision"]
    log(f"downloading {repo_id}{f' at {revision}' if revision else ''} from the Hugging Face Hub (or its cache)")
    files = [
        "model_index.json",
        "scheduler/scheduler_config.json",
        *(f"{name}/config.json" for name in weights.PIPELINE_NETWORKS),
        *(f"{name}/*" for name in weights.PIPELINE_COPIED if name != "scheduler"),
    ]
    safetensors = _weight_patterns(weights.PIPELINE_NETWORKS, variant, "safetensors")
    snapshot = Path(_snapshot(spec, repo_id, revision, files + safetensors, error))
    without = [name for name in weights.PIPELINE_NETWORKS if _lacks(snapshot, name, safetensors)]
    if without:  # older repositories: pickled weights, read with weights_only=True
        _snapshot(spec, repo_id, revision, _weight_patterns(without, variant, "bin"), error)
    return snapshot, f"{repo_id}@{snapshot.name}"


def _weight_patterns(names, variant: str | None, extension: str) -> list[str]:
    """Single files, shard indexes and shards of one variant, as diffusers and transformers name them."""
    tag = f".{variant}" if variant else ""
    return [
        pattern
        for name in names
        for stem in weights.WEIGHT_FILE_STEMS
        for pattern in (
            f"{name}/{stem}{tag}.{extension}",
            f"{name}/{stem}.{extension}.index{tag}.json",
            f"{name}/{stem}-?????-of-?????{tag}.{extension}",
        )
    ]


def _lacks(snapshot: Path, name: str, patterns: list[str]) -> bool:
    """Whether network ``name`` is in the snapshot without a file matching ``patterns``."""
    folder = snapshot / name
    return folder.is_dir() and not any(fnmatch(f"{name}/{f.name}", p) for f in folder.iterdir() for p in patterns)


def _snapshot(spec: str, repo_id: str, revision: str | None, patterns: list[str], error: type[Exception]) -> str:
    try:
        return huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=patterns)
    except errors.GatedRepoError as problem:
        raise error(
            f"--from {spec}: {repo_id} is gated: accept its licence on https://huggingface.co/{repo_id}, "
            "then log in here with `hf auth login` (or set HF_TOKEN)"
        ) from problem
    except errors.RepositoryNotFoundError as problem:
        raise error(
            f"--from {spec} is no local folder and no Hugging Face Hub repository (or a private one, and you are "
            "not logged in): check the path or the id, or log in with `hf auth login` (or set HF_TOKEN)"
        ) from problem
    except errors.RevisionNotFoundError as problem:
        raise error(
            f"--from {spec}: {repo_id} has no revision {revision!r}: give a branch, tag or commit that exists"
        ) from problem
    except errors.LocalEntryNotFoundError as problem:
        raise error(
            f"--from {spec} is no local folder, and {repo_id} is not (wholly) in the Hugging Face cache "
            f"({huggingface_hub.constants.HF_HUB_CACHE}) while the hub cannot be reached (HF_HUB_OFFLINE is set, "
            "or no network): download it once with network access, or check the path"
        ) from problem
