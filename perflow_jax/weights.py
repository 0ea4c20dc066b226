"""Flax parameter trees <-> PyTorch state dicts (diffusers / transformers key names).

The Flax twins in ``perflow_jax.models`` keep the PyTorch module names, dots included, so a
parameter path joined with "." is the state-dict key up to its last part. ``LEAF_RULES`` is the
whole mapping, read one way by ``params_to_state_dict`` and the other by
``state_dict_to_params``:

| Flax leaf       | rank | PyTorch leaf    | layout change                                    |
|-----------------|------|-----------------|--------------------------------------------------|
| kernel          | 4    | weight          | conv HWIO <-> OIHW                               |
| kernel          | 2    | weight          | dense [in, out] <-> Linear [out, in]             |
| scale           | 1    | weight          | GroupNorm / LayerNorm                            |
| embedding       | 2    | weight          | Embedding                                        |
| bias            | 1    | bias            |                                                  |
| class_embedding | 1    | class_embedding | CLIP image tower's class token, a bare parameter |
| running_mean    | 1    | running_mean    | BatchNorm statistics (Inception-v3 of FID)       |
| running_var     | 1    | running_var     |                                                  |

Reading also accepts the key names older diffusers checkpoints use (``LEGACY_RENAMES``), text
encoders saved by transformers >= 5 without their ``text_model.`` prefix, and drops buffers that
are not parameters (``IGNORED_TORCH_KEYS``). Pickled ``.bin`` files are read only through
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np
from etils import epath

from perflow_jax import paths
from perflow_jax.models import NETWORKS as NETWORK_CLASSES


class LeafRule(NamedTuple):
    flax_leaf: str
    rank: int
    torch_leaf: str
    to_torch: tuple[int, ...] | None  # axes permutation Flax -> PyTorch, None for identity

    @property
    def to_flax(self) -> tuple[int, ...] | None:
        return None if self.to_torch is None else tuple(int(i) for i in np.argsort(self.to_torch))


LEAF_RULES = (
    LeafRule("kernel", 4, "weight", (3, 2, 0, 1)),
    LeafRule("kernel", 2, "weight", (1, 0)),
    LeafRule("scale", 1, "weight", None),
    LeafRule("embedding", 2, "weight", None),
    LeafRule("bias", 1, "bias", None),
    LeafRule("class_embedding", 1, "class_embedding", None),
    LeafRule("running_mean", 1, "running_mean", None),
    LeafRule("running_var", 1, "running_var", None),
)

# Older diffusers VAE checkpoints (e.g. SD1.5's) name the mid-block attention projections the
# way diffusers' AttentionBlock did; diffusers renames them on load, and so do we.
LEGACY_RENAMES = (
    (re.compile(r"(attentions\.\d+)\.query\."), r"\1.to_q."),
    (re.compile(r"(attentions\.\d+)\.key\."), r"\1.to_k."),
    (re.compile(r"(attentions\.\d+)\.value\."), r"\1.to_v."),
    (re.compile(r"(attentions\.\d+)\.proj_attn\."), r"\1.to_out.0."),
)

# transformers >= 5 saves CLIPTextModel's weights without this prefix; older files have it.
OPTIONAL_PREFIX = "text_model."

# Buffers saved beside the parameters: position ids (some transformers versions), BatchNorm's step count.
IGNORED_TORCH_KEYS = re.compile(r"(^|\.)(position_ids|num_batches_tracked)$")


class WeightsMismatchError(ValueError):
    """A state dict does not fit a network: keys missing, unexpected or of the wrong shape.

    ``missing``, ``unexpected``, ``misshaped``: every such PyTorch key ("key: shape, expected shape"
    for the mis-shaped), for callers that word the error their own way.
    """

    def __init__(self, message: str, missing=(), unexpected=(), misshaped=()):
        super().__init__(message)
        self.missing, self.unexpected, self.misshaped = list(missing), list(unexpected), list(misshaped)


def flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
    """{'a': {'b.0': {'kernel': x}}} -> {'a.b.0.kernel': x}."""
    return {key: leaf for key, (_, leaf) in _leaf_paths(tree).items()}


def _leaf_paths(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[str, tuple[tuple[str, ...], Any]]:
    """Flattened key -> (path tuple, leaf), keeping module names that contain dots intact."""
    leaves = {}
    for name, value in tree.items():
        path = prefix + (name,)
        if isinstance(value, Mapping):
            leaves.update(_leaf_paths(value, path))
        else:
            leaves[".".join(path)] = (path, value)
    return leaves


def _torch_key(flax_key: str, rank: int) -> tuple[str, LeafRule]:
    """'down.0.kernel' of rank 2 -> ('down.0.weight', the rule that maps it)."""
    module, _, leaf = flax_key.rpartition(".")
    for rule in LEAF_RULES:
        if rule.flax_leaf == leaf and rule.rank == rank:
            return f"{module}.{rule.torch_leaf}", rule
    raise ValueError(f"no weight rule for a Flax parameter {leaf!r} of rank {rank}")


def _permute(array: np.ndarray, axes: tuple[int, ...] | None) -> np.ndarray:
    return array if axes is None else np.ascontiguousarray(np.transpose(array, axes))


def params_to_state_dict(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Flax parameter tree -> flat PyTorch state dict of numpy arrays (same dtypes)."""
    state = {}
    for key, value in flatten(params).items():
        array = np.asarray(value)
        torch_key, rule = _torch_key(key, array.ndim)
        state[torch_key] = _permute(array, rule.to_torch)
    return state


def state_dict_to_params(
    state_dict: Mapping[str, Any], template: Mapping[str, Any], *, name: str = "network"
) -> dict[str, Any]:
    """Flat PyTorch state dict (key -> array-like) -> nested dict of numpy arrays in its dtypes, shaped like
    ``template`` (e.g. from ``jax.eval_shape``; only its leaves' shapes are read). ``name`` ("unet", "vae", ...)
    is for error messages.

    Raises WeightsMismatchError listing (in PyTorch key names) the first ten missing, unexpected and
    mis-shaped keys.
    """
    # What each template leaf is called on the PyTorch side: (path, rule, PyTorch shape).
    wanted = {}
    for flat_key, (path, leaf) in _leaf_paths(template).items():
        torch_key, rule = _torch_key(flat_key, len(leaf.shape))
        wanted[torch_key] = (path, rule, tuple(leaf.shape[i] for i in rule.to_torch or range(len(leaf.shape))))

    tree: dict[str, Any] = {}
    unexpected, misshaped = [], []
    seen = set()  # PyTorch-side keys (after legacy renames) that were found, fitting or not
    for torch_key, value in state_dict.items():
        if IGNORED_TORCH_KEYS.search(torch_key):
            continue
        key = _apply_legacy_renames(torch_key)
        if key not in wanted and OPTIONAL_PREFIX + key in wanted:
            key = OPTIONAL_PREFIX + key
        if key not in wanted:
            unexpected.append(torch_key)
            continue
        path, rule, expected = wanted[key]
        seen.add(key)
        if tuple(np.shape(value)) != expected:
            misshaped.append(f"{torch_key}: {tuple(np.shape(value))}, expected {expected}")
            continue
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = _permute(np.asarray(value), rule.to_flax)
    missing = [key for key in wanted if key not in seen]
    if missing or unexpected or misshaped:
        raise WeightsMismatchError(
            _mismatch_message(f"the {name} weights do not fit the {name} config", missing, unexpected, misshaped),
            missing,
            unexpected,
            misshaped,
        )
    return tree


def _apply_legacy_renames(key: str) -> str:
    for pattern, replacement in LEGACY_RENAMES:
        key = pattern.sub(replacement, key)
    return key


SAME_MODEL_HINT = (
    "Are the weights and config.json from the same model (e.g. SDXL weights with an SD1.5 config)? "
    "Take both from one diffusers folder."
)
DELTA_HINT = (
    "Delta weights apply to a UNet of the architecture they were trained from (SD1.5 deltas to "
    "SD1.5-architecture UNets)."
)


def _mismatch_message(
    title: str, missing: list[str], unexpected: list[str], misshaped: list[str], hint: str = SAME_MODEL_HINT
) -> str:
    lines = [f"{title}:"]
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if keys:
            more = f" (first 10 of {len(keys)})" if len(keys) > 10 else ""
            lines.append(f"  {len(keys)} {label} keys{more}:")
            lines.extend(f"    {key}" for key in keys[:10])
    lines.append(hint)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Weight files


class WeightsFileError(ValueError):
    """A weight file (or a model's JSON file) is missing, truncated, corrupt or of an unsupported kind."""


# diffusers names its weight files diffusion_pytorch_model.*, transformers model.*.
WEIGHT_FILE_STEMS = ("diffusion_pytorch_model", "model")


class SafetensorsStateDict(Mapping):
    """The tensors of one or more safetensors files, read one at a time when asked for (as numpy
    arrays, or torch tensors with ``framework="pt"``).

    Converting through it holds one copy of a network in memory, not two (SDXL's UNet is 10 GB
    in float32). Headers are read on construction, so a truncated or corrupt file fails here.
    """

    def __init__(self, files: list[Path], framework: str = "numpy"):
        from safetensors import SafetensorError, safe_open

        self._handle_of: dict[str, Any] = {}  # key -> the open file (memory-mapped) holding it
        for file in files:
            try:
                handle = safe_open(str(file), framework=framework)
            except (SafetensorError, OSError) as error:
                raise WeightsFileError(
                    f"{file} is truncated or corrupt ({error}): download or copy it again"
                ) from error
            self._handle_of.update(dict.fromkeys(handle.keys(), handle))

    def __getitem__(self, key: str) -> np.ndarray:
        return self._handle_of[key].get_tensor(key)

    def __iter__(self):
        return iter(self._handle_of)

    def __len__(self) -> int:
        return len(self._handle_of)


def find_weight_files(folder: Path, variant: str | None = None) -> list[Path]:
    """The weight files of one component folder (e.g. ``unet/``), safetensors preferred.

    ``variant``: e.g. "fp16" for ``diffusion_pytorch_model.fp16.safetensors``. Without it the
    plain files are taken, else the only variant present.
    """
    folder = Path(folder)
    names = [f"{stem}{{}}.{ext}" for ext in ("safetensors", "bin") for stem in WEIGHT_FILE_STEMS]
    variants = [f".{variant}"] if variant else ["", *sorted(_variants_in(folder))]
    for tag in variants:
        for name in names:
            single = folder / name.format(tag)
            if single.is_file():
                return [single]
            index = folder / (name.format("") + f".index{tag}.json")
            if index.is_file():
                shards = sorted(set(read_json(index)["weight_map"].values()))
                missing = [shard for shard in shards if not (folder / shard).is_file()]
                if missing:
                    raise WeightsFileError(f"{index} names shards that are not there: {', '.join(missing[:10])}")
                return [folder / shard for shard in shards]
        if not variant and tag == "" and len(variants) > 2:
            raise WeightsFileError(
                f"{folder} has no plain weight file but several variants ({', '.join(v[1:] for v in variants[1:])}): "
                "choose one with --variant"
            )
    wanted = f"variant {variant!r} " if variant else ""
    raise WeightsFileError(
        f"{folder} holds no {wanted}weight file (looked for {', '.join(n.format('') for n in names)}"
        f"{' with .' + variant if variant else ''} and their .index.json): is the download complete?"
    )


def _variants_in(folder: Path) -> set[str]:
    """Variant tags present, e.g. {".fp16"} for diffusion_pytorch_model.fp16.safetensors."""
    pattern = re.compile(rf"(?:{'|'.join(WEIGHT_FILE_STEMS)})(\.[^.]+)\.(?:safetensors|bin)")
    files = folder.glob("*") if folder.is_dir() else ()
    return {match.group(1) for file in files if (match := pattern.fullmatch(file.name))}


def read_state_dict(folder: Path, variant: str | None = None) -> Mapping[str, np.ndarray]:
    """The state dict of one component folder as numpy arrays (safetensors files read lazily)."""
    files = find_weight_files(folder, variant)
    if files[0].suffix == ".safetensors":
        return SafetensorsStateDict(files)
    return {key: value for file in files for key, value in read_torch_pickle(file).items()}


def read_torch_pickle(file: Path) -> dict[str, np.ndarray]:
    """A pickled PyTorch state dict (.bin / .pt), loaded with ``weights_only=True`` only."""
    return {key: torch_to_numpy(value) for key, value in load_torch_pickle(file).items()}


def load_torch_pickle(file: Path) -> dict[str, Any]:
    """The tensors of a pickled PyTorch state dict (.bin / .pt / .ckpt, unwrapped from a ``state_dict``
    entry), loaded with ``weights_only=True`` only."""
    import torch

    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        code = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        reason = f"it needs the code {code[1]} to load" if code else str(error).strip().splitlines()[0]
        raise WeightsFileError(
            f"{file} cannot be read as a PyTorch state dict with weights_only=True ({reason}); "
            "pickled files that need code to load are refused (loading could run it): use its safetensors version"
        ) from error
    if not isinstance(state, Mapping):
        raise WeightsFileError(f"{file} holds a {type(state).__name__}, not a PyTorch state dict (a dict of tensors)")
    while isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return {key: value for key, value in state.items() if hasattr(value, "detach")}


def torch_to_numpy(tensor) -> np.ndarray:
    """A torch tensor as a numpy array of the same dtype (bfloat16 as ml_dtypes.bfloat16)."""
    import torch

    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def read_delta(path: Path) -> Mapping[str, np.ndarray]:
    """PeRFlow delta weights: a flat safetensors (or .bin) file with diffusers UNet keys."""
    path = Path(path)
    if not path.is_file():
        raise WeightsFileError(f"delta weights file {path} does not exist")
    if path.suffix == ".safetensors":
        return SafetensorsStateDict([path])
    return read_torch_pickle(path)


class DeltaAppliedStateDict(Mapping):
    """W + delta for every key, computed one tensor at a time as the authors' loader does it.

    The sum is taken in the delta's dtype and cast back to W's dtype. The key sets must be equal;
    a shape mismatch is reported when the tensor is read.
    """

    def __init__(self, base: Mapping[str, Any], delta: Mapping[str, Any]):
        base_keys, delta_keys = set(base), set(delta)
        if base_keys != delta_keys:
            missing = sorted(base_keys - delta_keys)
            unexpected = sorted(delta_keys - base_keys)
            raise WeightsMismatchError(
                _mismatch_message("the delta weights do not fit the UNet", missing, unexpected, [], hint=DELTA_HINT)
            )
        self._base, self._delta = base, delta

    def __getitem__(self, key: str) -> np.ndarray:
        w, d = np.asarray(self._base[key]), np.asarray(self._delta[key])
        if w.shape != d.shape:
            raise WeightsMismatchError(
                f"the delta weights do not fit the UNet: {key} is {d.shape} in the delta but {w.shape} in the UNet"
            )
        return (w.astype(d.dtype) + d).astype(w.dtype)

    def __iter__(self):
        return iter(self._base)

    def __len__(self) -> int:
        return len(self._base)


# ---------------------------------------------------------------------------------------------
# Diffusers pipeline folders

PIPELINE_NETWORKS = ("unet", "vae", "text_encoder", "text_encoder_2")
PIPELINE_COPIED = ("tokenizer", "tokenizer_2", "scheduler")
PIPELINE_REQUIRED = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# Pipeline parts that play no role in PeRFlow training or sampling.
PIPELINE_IGNORED = ("safety_checker", "feature_extractor", "image_encoder")


def read_model_index(source: Path) -> dict[str, str]:
    """The pipeline's components that this project converts or copies: {name: class name}.

    Raises WeightsFileError for a folder without model_index.json, a listed component without its
    subfolder, a network class without a Flax twin, or a required component that is absent.
    """
    index_file = source / "model_index.json"
    if not index_file.is_file():
        raise WeightsFileError(
            f"{source} is not a diffusers pipeline folder (no model_index.json): give the folder that "
            "DiffusionPipeline.save_pretrained wrote (or a complete download of the model repository)"
        )
    index = read_json(index_file)
    components = {}
    for name, entry in index.items():
        if name.startswith("_") or name in PIPELINE_IGNORED or not isinstance(entry, list) or entry[1] is None:
            continue
        class_name = entry[1]
        if name in PIPELINE_NETWORKS and class_name not in NETWORK_CLASSES:
            raise WeightsFileError(
                f"model_index.json gives {name} the class {class_name!r}, which has no Flax twin here: "
                f"supported network classes are {', '.join(NETWORK_CLASSES)}"
            )
        if name not in PIPELINE_NETWORKS + PIPELINE_COPIED:
            raise WeightsFileError(
                f"model_index.json lists a component {name!r} ({class_name}) that this project does not know: "
                f"it converts {', '.join(PIPELINE_NETWORKS)} and copies {', '.join(PIPELINE_COPIED)} "
                "(Stable Diffusion pipelines)"
            )
        if not (source / name).is_dir():
            raise WeightsFileError(
                f"model_index.json lists {name} but {source} has no {name}/ subfolder: is the download complete?"
            )
        components[name] = class_name
    missing = [name for name in PIPELINE_REQUIRED if name not in components]
    if missing:
        raise WeightsFileError(
            f"{source} has no {', '.join(missing)} in model_index.json: a Stable Diffusion pipeline needs "
            f"{', '.join(PIPELINE_REQUIRED)}"
        )
    return components


# ---------------------------------------------------------------------------------------------
# Parameter checkpoints (Orbax) and diffusers UNet folders

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
# What networks may compute in: float16 gradients underflow without loss scaling, which training does not do.
COMPUTE_DTYPES = ("float32", "bfloat16")


def cast_params(params: Any, dtype: str) -> Any:
    """Every floating-point leaf cast to ``dtype`` (a key of DTYPES), as numpy arrays."""
    import jax

    target = np.dtype(DTYPES[dtype])
    return jax.tree.map(lambda x: np.asarray(x).astype(target, copy=False), params)


def save_params(path: epath.Path, params: Any) -> None:
    """Write a parameter tree as an Orbax checkpoint at ``path`` (which must not exist yet; may be a URL)."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(paths.absolute(path), params)


def load_params(path: epath.Path) -> Any:
    """A parameter tree written by ``save_params``, as numpy arrays in their stored dtypes."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(paths.absolute(path))


def write_diffusers_unet(params: Any, config: Mapping[str, Any], out: Path, dtype: str = "float32") -> Path:
    """A diffusers-loadable UNet folder ``out`` (created if needed): ``config.json`` from ``config`` (the UNet's
    diffusers config) and ``diffusion_pytorch_model.safetensors`` from ``params`` in ``dtype`` (a key of DTYPES).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    target = np.dtype(DTYPES[dtype])
    state = {key: value.astype(target, copy=False) for key, value in params_to_state_dict(params).items()}
    save_safetensors(state, out / "diffusion_pytorch_model.safetensors")
    config = {"_class_name": "UNet2DConditionModel", **config}
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


def require_empty(out: Path, error: type[Exception], fix: str) -> None:
    """Raise ``error`` if ``out`` is a file or a folder with something in it: commands write only new folders.

    ``fix`` ends the message with what the user can do, e.g. "choose another --out or pass --overwrite".
    """
    out = epath.Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise error(f"{out} exists and is not empty: {fix}")


def check_out(out: Path, inputs: Mapping[str, Any], error: type[Exception], flag: str = "--out") -> None:
    """Raise ``error`` before any work if writing ``out`` would destroy an input or cannot succeed.

    Refused: an ``out`` that is, contains or lies inside one of ``inputs`` ({flag: path or None}, the
    command's existing inputs, symlinks resolved), since writing or replacing it deletes that input;
    and an ``out`` whose folder (or ``out`` itself, when a folder) takes no new file. That is tried,
    not read from permission bits, which say nothing for root or a read-only mount.
    """
    target = Path(out).resolve()
    for name, path in inputs.items():
        if path is None or paths.is_url(path) or not Path(path).exists():  # a URL is no local folder's
            continue
        source = Path(path).resolve()
        if target == source:
            relation = "is"
        elif target in source.parents:
            relation = "contains"
        elif source in target.parents:
            relation = "lies inside"
        else:
            continue
        raise error(f"{flag} {out} {relation} {name} {path}, which this command reads: write the output elsewhere")
    folder = target.parent
    while not folder.exists():
        folder = folder.parent
    for place in (folder, target) if target.is_dir() else (folder,):
        try:
            tempfile.TemporaryFile(dir=place).close()
        except OSError as problem:
            raise error(f"{flag} {out} cannot be written: {place}: {problem.strerror}; choose another {flag}") from None


def staging_folder(out: Path, log: Callable[[str], Any] = print) -> Path:
    """A new, empty hidden folder beside ``out`` to write into before ``replace_folder``.

    The hidden folders that runs killed while writing ``out`` left beside it are removed first:
    those of this host whose process is gone. A live process's (a run writing the same ``out`` now)
    and another host's (on a shared disk, whose processes this host cannot see) are kept.
    """
    out = Path(out)
    for stale in out.parent.glob(f".{glob.escape(out.name)}.*"):
        kind, _, pid = stale.name[len(out.name) + 2 :].rpartition("-")
        if kind in (f"writing-{_HOST}", f"replaced-{_HOST}") and pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
            log(f"removed {stale}, left by a run that stopped while writing {out} (process {pid} is gone)")
    staging = out.parent / f".{out.name}.writing-{_HOST}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


_HOST = socket.gethostname()


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


def replace_folder(staging: Path, out: Path) -> None:
    """Move the finished ``staging`` folder to ``out``, replacing what was there: nothing half-written."""
    if out.exists():
        old = out.parent / f".{out.name}.replaced-{_HOST}-{os.getpid()}"
        out.rename(old)
        staging.rename(out)
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    else:
        staging.rename(out)


def read_json(path: epath.Path) -> dict[str, Any]:
    """The object of a JSON file (or URL); a file that is not JSON raises WeightsFileError naming where."""
    path = epath.Path(path)
    try:
        value = json.loads(path.read_bytes())
    except json.JSONDecodeError as error:
        raise WeightsFileError(
            f"{path} is not valid JSON: {error.msg} at line {error.lineno}, column {error.colno}: "
            "repair the file or copy it again"
        ) from None
    except UnicodeDecodeError:
        raise WeightsFileError(f"{path} is not UTF-8 text: repair the file or copy it again") from None
    if not isinstance(value, dict):
        raise WeightsFileError(f"{path} holds a JSON {type(value).__name__}, not an object: repair the file")
    return value


def save_safetensors(tensors: Mapping[str, np.ndarray], path: Path, metadata: Mapping[str, str] | None = None) -> None:
    """``safetensors.numpy.save_file`` with the mode a plain ``open`` gives a new file (0644 under umask 022).

    safetensors writes through a temporary file of mode 0600, which other users could not read.
    ``metadata``: string entries for the header besides {"format": "pt"}.
    """
    from safetensors.numpy import save_file

    save_file(dict(tensors), str(path), metadata={"format": "pt", **(metadata or {})})
    umask = os.umask(0o022)  # reading the umask means setting it; the commands write from one thread
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


# ---------------------------------------------------------------------------------------------
# Converted folders: one subfolder per network with its config.json and its Orbax parameters.

CONVERTED_MANIFEST = "perflow_model.json"


def write_component(folder: epath.Path, name: str, class_name: str, config: Mapping[str, Any], params: Any) -> None:
    """``folder/name/config.json`` (the PyTorch config, ``_class_name`` set) and ``folder/name/params``."""
    target = epath.Path(folder) / name
    target.mkdir(parents=True, exist_ok=True)
    (target / "config.json").write_text(json.dumps({**config, "_class_name": class_name}, indent=2) + "\n")
    save_params(target / "params", params)


def read_component(folder: epath.Path, name: str) -> tuple[str, dict[str, Any], Any]:
    """(PyTorch class name, config dict, parameter tree) of one network of a converted folder (or URL)."""
    folder = epath.Path(folder)
    if not (folder / CONVERTED_MANIFEST).is_file():
        hint = (
            "it is a diffusers folder: convert it first with python -m perflow_jax.convert --from "
            f"{folder} --out CONVERTED_DIR"
            if (folder / "model_index.json").is_file()
            else "give the --out folder of python -m perflow_jax.convert"
        )
        raise WeightsFileError(f"{folder} is not a converted model folder (no {CONVERTED_MANIFEST}): {hint}")
    config_file = folder / name / "config.json"
    if not config_file.is_file():
        present = sorted(p.name for p in folder.iterdir() if (p / "params").is_dir())
        raise WeightsFileError(f"{folder} has no network {name!r}; it has {', '.join(present)}")
    config = read_json(config_file)
    return config["_class_name"], config, load_params(folder / name / "params")
