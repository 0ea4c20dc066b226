"""The Hugging Face Hub: a pipeline's files downloaded for ``convert --from ORG/NAME[@REVISION]``, and
an export uploaded with a model card for ``export --push-to-hub ORG/NAME``.

Downloads go through ``huggingface_hub.snapshot_download`` into its cache, so HF_HOME /
HF_HUB_CACHE, HF_HUB_OFFLINE and the token (``hf auth login`` or HF_TOKEN) apply as they do for
diffusers. Only what conversion reads is fetched: model_index.json, the networks' configs, the
tokenizers, the scheduler config and one weight variant per network (safetensors; ``.bin`` only
for a network that has no safetensors of that variant). Uploads use the same token.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import huggingface_hub
from huggingface_hub import errors

from perflow_jax import __version__, checkpoint, lora, pipeline, weights

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


def read_evaluation(folder: Path, error: type[Exception]) -> dict[str, Any]:
    """The metrics.json that ``python -m perflow_jax.evaluate --out folder`` wrote."""
    path = Path(folder) / "metrics.json"
    if not path.is_file():
        raise error(
            f"--evaluation {folder} holds no metrics.json: give the --out folder of a finished "
            "python -m perflow_jax.evaluate run, or leave --evaluation out"
        )
    return weights.read_json(path)


def model_card(
    folder: Path, model: Path, *, step: int | None, base: Path | None, metrics: dict[str, Any] | None
) -> str:
    """README.md for an export ``folder`` of ``model``: base model, recipe, sampling settings, quality figures.

    The base model is a converted folder's source (a hub id after ``convert --from ORG/NAME``), else
    its path. Sampling steps and guidance come from the evaluation (``metrics``), else the run's config.
    """
    described = pipeline.describe(model, step=step)
    teacher = Path(base) if base else described.folder
    manifest = teacher / weights.CONVERTED_MANIFEST
    base_model = weights.read_json(manifest)["source"] if manifest.is_file() else str(teacher)
    scheduler = weights.read_json(Path(folder) / "scheduler" / "scheduler_config.json")
    parameterization, windows = pipeline.perflow_scheduler_settings(scheduler)
    rows = [("base model", base_model), ("parameterization", parameterization), ("time windows", windows)]
    steps, guidance = 4, None
    if described.workdir:
        config = checkpoint.run_config(model, step=described.step)[1]
        rows += [
            ("training steps", described.step),
            ("teacher DDIM steps per window", config["perflow"]["solver_steps"]),
            ("teacher guidance", config["perflow"]["teacher_guidance"]),
        ]
        steps, guidance = config["log"]["sample_steps"], config["log"]["sample_guidance"]
    if metrics:
        steps, guidance = metrics["settings"]["steps"][0], metrics["settings"]["guidance"] or guidance
    rows += [("sampling steps", steps), ("guidance", guidance if guidance is not None else "sample's default")]
    hub_id = HUB_ID.fullmatch(base_model)
    lines = ["---", "library_name: diffusers", "tags:", "- perflow", "- text-to-image"]
    lines += [f"base_model: {hub_id['repo']}"] if hub_id else []
    lines += ["---", "", f"# PeRFlow student of {base_model}", ""]
    lines += [
        f"A piecewise rectified flow (PeRFlow) student exported by perflow_jax {__version__}: "
        "`perflow_jax.torch.PeRFlowScheduler` samples it in a few steps.",
        "",
        "| setting | value |",
        "| --- | --- |",
        *(f"| {name} | {value} |" for name, value in rows),
        "",
        "```python",
        "import perflow_jax.torch  # pip install 'perflow_jax[torch]': PeRFlowScheduler, merge_delta_weights",
        "from diffusers import DiffusionPipeline",
        "",
        *_loading_lines(Path(folder), base_model),
        f"image = pipe(prompt, num_inference_steps={steps}"
        + (f", guidance_scale={guidance}" if guidance is not None else "")
        + ").images[0]",
        "```",
    ]
    if metrics:
        lines += ["", f"## Quality ({metrics['feature_network']} features, python -m perflow_jax.evaluate)", ""]
        lines += ["| sampler | images | FID | other |", "| --- | --- | --- | --- |"]
        for name, entry in metrics["samplers"].items():
            fid = ", ".join(f"{value:.2f} vs {reference}" for reference, value in entry["fid"].items())
            known = ("images", "seconds", "images_per_second", "fid")
            other = ", ".join(f"{key} {value:.4f}" for key, value in entry.items() if key not in known)
            lines.append(f"| {name} | {entry['images']} | {fid} | {other} |")
        lines += ["", "Settings: `" + json.dumps(metrics["settings"], sort_keys=True) + "`"]
    return "\n".join(lines) + "\n"


def push_folder(
    folder: Path, repo_id: str, card: str, error: type[Exception], log: Callable[[str], Any] = print
) -> str:
    """Write ``card`` as ``folder``/README.md and upload ``folder`` to model repository ``repo_id``; returns its URL."""
    (Path(folder) / "README.md").write_text(card)
    api = huggingface_hub.HfApi()
    try:
        url = str(api.create_repo(repo_id, exist_ok=True))
        api.upload_folder(
            repo_id=repo_id, folder_path=folder, commit_message=f"PeRFlow student (perflow_jax {__version__})"
        )
    except errors.LocalTokenNotFoundError as problem:
        raise error(f"--push-to-hub {repo_id}: not logged in: run `hf auth login` or set HF_TOKEN") from problem
    except errors.HfHubHTTPError as problem:
        status = problem.response.status_code
        if status == 401:
            fix = "not logged in, or the token is invalid: run `hf auth login` or set HF_TOKEN (write access)"
        elif status == 403:
            fix = (
                "this token may not write there (another user's or organization's repository, or a read-only "
                "token): choose ORG/NAME under your account or an organization you write to"
            )
        else:
            fix = f"the hub answered {status} ({str(problem).splitlines()[0]}): try again later"
        raise error(f"--push-to-hub {repo_id}: {fix}; the export stays in {folder}") from problem
    log(f"uploaded {folder} to {url}")
    return url


def _loading_lines(folder: Path, base_model: str) -> list[str]:
    """How the card's snippet gets a pipeline: the repository itself when it holds one (an export with
    --base), else the base model with the repository's LoRA or UNet and scheduler on top."""
    if (folder / "model_index.json").is_file():
        return ['pipe = DiffusionPipeline.from_pretrained("THIS_REPO")']
    lines = [
        f'pipe = DiffusionPipeline.from_pretrained("{base_model}")  # the base model',
        'pipe.scheduler = perflow_jax.torch.PeRFlowScheduler.from_pretrained("THIS_REPO", subfolder="scheduler")',
    ]
    if (folder / lora.LORA_FILE).is_file():
        return [*lines, 'pipe.load_lora_weights("THIS_REPO")']
    return [*lines, 'pipe.unet = type(pipe.unet).from_pretrained("THIS_REPO", subfolder="unet")']
