"""gs:// WORKDIRs and model folders: the project's own reads and writes go through etils.epath.

Each test runs the code on ``gs://bucket/...`` URLs served by a local folder (tests/helpers/fake_gcs.py),
the code path of a real bucket; Orbax's part is handed the URL as it is (its array files go through
TensorStore's GCS driver, which no fsspec file system stands in for: tests/test_train.py and
tests/test_checkpoint.py check it on local folders).
"""

import json
import re
import socket
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest
import transformers
from PIL import Image

from perflow_jax import checkpoint, export, image_io, paths, pipeline, prepare_data, recipe, reporting, weights
from perflow_jax.demo.tokenizer import write_tiny_clip_tokenizer
from tests.helpers.fake_gcs import fake_gcs
from tests.helpers.networks import TINY_VAE
from tests.helpers.recipes import load

PACKAGE = Path(__file__).resolve().parents[1] / "perflow_jax"
PATHLIB_CALL = re.compile(r"(?<![\w.])Path\(|pathlib\.Path\(")  # not epath.Path(

# Modules that read only local files by design (prepare_data's inputs, evaluation references, LoRA and
# single-file checkpoints, hub downloads, the package's own files): pathlib is theirs to use.
LOCAL_ONLY = {
    "clip_score.py", "fid.py", "fid_inception.py", "hub.py", "lora.py", "recipe.py",
    "single_file.py", "evaluate.py", "demo/__init__.py", "demo/train_teacher.py",
}  # fmt: skip
# The local-only inputs of modules that also read WORKDIRs or model folders: each pathlib call, as written.
LOCAL_CALLS = {
    "convert.py": [
        "out = epath.Path(out) if remote else Path(out)",
        'staging = Path(tempfile.mkdtemp(prefix="perflow_convert-")) if remote else weights.staging_folder(out, log)',
        "checkpoint, source, single = _read_single_file(Path(source), base, config, ema, variant, log)",
        "source = Path(source)",
        '"perflow_delta": str(Path(perflow_delta).resolve()) if perflow_delta else None,',
        "base = Path(base)",
        # --controlnet DIR[:NAME], a diffusers ControlNet folder
        "folder, name = (Path(folder), name) if colon and not Path(arg).exists() else (Path(arg), Path(arg).name)",
    ],
    "data.py": [
        "path = Path(folder) / MANIFEST",
        'return [Path(folder) / shard["file"] for shard in manifest["shards"]]',
    ],
    "prepare_data.py": [  # the input sources and --out (ArrayRecord writes a local disk)
        "path = Path(spec)",
        "path = Path(spec)",
        'return sorted(path.glob("*.tar")) if path.is_dir() else [Path(p) for p in sorted(glob.glob(spec))] or [path]',
        "path = Path(spec)",
        "out = Path(out)",
    ],
    "export.py": [
        "components = read_model_index(Path(base)) if base else None",
        "_check_same_architecture(unet_config, Path(base))",
        "teacher_dir = teacher_dir if described.workdir else (Path(base) if base else None)",
        "written = write_export(staging / EXPORT_FILE, student, unet_config, Path(base) if base else None, dtype)",
        "_write_pipeline(staging, Path(base), components)",
    ],
    "sample.py": [
        "path = Path(path)",
        'if o.out is None or Path(o.out).suffix.lower() != ".png":',
        "if o.init_noise is not None and not Path(o.init_noise).is_file():",
        "out = Path(o.out)",
        "Path(path).parent.mkdir(parents=True, exist_ok=True)",
        "if not Path(path).is_file():",  # a --control image
        "if not Path(path).is_file():",  # the --init-image
    ],
    "weights.py": [
        "folder = Path(folder)",
        "path = Path(path)",
        "out = Path(out)",
        "target = Path(out).resolve()",
        "if path is None or paths.is_url(path) or not Path(path).exists():  # a URL is no local folder's",
        "source = Path(path).resolve()",
    ],
    "paths.py": [
        "return epath.Path(path) if is_url(path) else epath.Path(pathlib.Path(path).absolute())",
        "return pathlib.Path(path)",
        "yield pathlib.Path(folder)",
        "(pathlib.Path(copy) / file.name).write_bytes(file.read_bytes())",
        "yield pathlib.Path(copy)",
    ],
}


def test_no_pathlib_path_on_a_workdir_or_model_folder_outside_the_local_only_inputs():
    found = {}
    for file in sorted(PACKAGE.rglob("*.py")):
        name = file.relative_to(PACKAGE).as_posix()
        if name in LOCAL_ONLY or name.startswith("torch/"):
            continue
        calls = [line.strip() for line in file.read_text().splitlines() if PATHLIB_CALL.search(line)]
        unexpected = [line for line in calls if line not in LOCAL_CALLS.get(name, [])]
        if unexpected:
            found[name] = unexpected
    assert found == {}, "pathlib.Path( turns gs://b/x into the local folder gs:/b/x: use etils.epath.Path"


@pytest.fixture
def gcs(tmp_path):
    """The local folder that holds the fake bucket's files (gs://bucket/KEY is tmp_path/gcs/bucket/KEY)."""
    with fake_gcs(tmp_path / "gcs") as root:
        (root / "bucket").mkdir(parents=True)
        yield root


def test_a_gs_workdir_gets_metrics_tensorboard_and_grids_and_a_resume_drops_the_later_rows(gcs):
    workdir = paths.absolute("gs://bucket/run")
    workdir.mkdir()
    first = reporting.Reporter(workdir)
    for n in (1, 2, 3):
        first.scalars(n, {"loss": float(n)}, f"step {n}")
    first.image(3, "samples/ema", np.zeros((8, 8, 3), np.uint8))
    first.close()
    image_io.save_png(np.full((4, 6, 3), 200, np.uint8), workdir / "samples" / "step_000003.png")
    resumed = reporting.Reporter(workdir, first_step=2)
    resumed.scalars(3, {"loss": 30.0}, "step 3")
    resumed.close()

    run = gcs / "bucket/run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(row["step"], row["loss"]) for row in rows] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    events = b"".join(file.read_bytes() for file in (run / "tensorboard").glob("events.out.tfevents.*"))
    assert b"loss" in events and b"samples/ema" in events
    np.testing.assert_array_equal(np.asarray(Image.open(run / "samples/step_000003.png")), 200)


def test_an_appended_gs_file_is_rewritten_whole_at_each_flush_and_goes_on_in_parts(gcs):
    file = paths.open_append(paths.absolute("gs://bucket/events"), "ab", part_bytes=10)
    file.write(b"abcdef")
    file.flush()
    assert (gcs / "bucket/events").read_bytes() == b"abcdef"
    file.write(b"ghijkl")
    file.flush()
    file.write(b"mno")
    file.close()
    assert (gcs / "bucket/events").read_bytes() == b"abcdefghijkl"
    assert (gcs / "bucket/events.0001").read_bytes() == b"mno"


def test_a_gs_workdir_lock_is_written_refuses_a_second_run_and_is_removed(gcs):
    (gcs / "bucket/run").mkdir()  # train_and_evaluate makes the WORKDIR first (a bucket needs no folders)
    with checkpoint.WorkdirLock("gs://bucket/run") as lock:
        assert str(lock.path) == "gs://bucket/run/lock"
        holder = json.loads((gcs / "bucket/run/lock").read_text())
        assert holder["host"] == socket.gethostname()
        with pytest.raises(checkpoint.CheckpointError, match="gs://bucket/run is in use by process"):
            checkpoint.WorkdirLock("gs://bucket/run").__enter__()
    assert not (gcs / "bucket/run/lock").exists()


def test_orbax_is_handed_a_gs_workdir_and_a_model_folder_as_urls(gcs, monkeypatch):
    handed = []

    class Recorder:
        def __init__(self, directory=None, *args, **kwargs):
            if directory is not None:
                handed.append(str(directory))

        def __enter__(self):
            return self

        def __exit__(self, *exc_info):
            pass

        def restore(self, path, *args, **kwargs):
            handed.append(str(path))

    monkeypatch.setattr(ocp, "CheckpointManager", Recorder)
    monkeypatch.setattr(ocp, "StandardCheckpointer", Recorder)
    checkpoint.Checkpoints("gs://bucket/run")
    weights.load_params("gs://bucket/model/unet/params")
    assert handed == ["gs://bucket/run/checkpoints", "gs://bucket/model/unet/params"]


def test_a_gs_model_folder_is_described_and_its_tokenizer_read_from_a_local_copy(gcs):
    folder = gcs / "bucket/model"
    for name, config in {
        "vae/config.json": TINY_VAE,
        "unet/config.json": {"sample_size": 8},
        "scheduler/scheduler_config.json": pipeline.perflow_scheduler_config({}, "velocity", 4),
    }.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(json.dumps(config))
    write_tiny_clip_tokenizer(folder / "tokenizer")

    described = pipeline.describe("gs://bucket/model")
    assert (str(described.folder), described.perflow, described.resolution) == (
        "gs://bucket/model",
        ("velocity", 4),
        32,
    )
    with paths.local_copy(described.folder / "tokenizer") as files:
        ids = transformers.CLIPTokenizer.from_pretrained(str(files))("a photo").input_ids
    assert ids == transformers.CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))("a photo").input_ids


def test_gs_data_is_refused_in_one_line_saying_to_mount_it_and_a_gs_model_path_is_kept():
    config = load("tiny")
    config.model.path, config.data.path = "gs://bucket/model", "gs://bucket/data"
    with pytest.raises(recipe.ConfigError) as refused:
        recipe.validate(config)
    (line,) = [line for line in str(refused.value).splitlines() if "data.path" in line]
    assert "gs://bucket/data is a URL" in line and "mount the bucket (gcsfuse)" in line
    assert recipe.with_absolute_paths(config).model.path == "gs://bucket/model"


def test_an_export_to_a_gs_folder_is_refused_saying_to_write_it_locally(tmp_path):
    with pytest.raises(export.ExportError, match=r"^--out gs://bucket/export is a URL, .* gcloud storage cp -r$"):
        export.export_to_torch("gs://bucket/run", "gs://bucket/export")
    with pytest.raises(export.ExportError, match=r"^--base gs://bucket/sd15 is a URL, .* gcloud storage cp -r$"):
        export.export_to_torch("gs://bucket/run", tmp_path / "export", base="gs://bucket/sd15")


def test_a_gs_diffusers_folder_is_refused_saying_to_convert_it(gcs):
    (gcs / "bucket/sd15").mkdir()
    (gcs / "bucket/sd15/model_index.json").write_text(json.dumps({"unet": ["diffusers", "UNet2DConditionModel"]}))
    with pytest.raises(weights.WeightsFileError, match=r"^gs://bucket/sd15 is a diffusers folder on a bucket, .*"):
        pipeline.load_model("gs://bucket/sd15")


def test_prepare_data_hands_a_gs_model_folder_to_the_loader_as_a_url(tmp_path, monkeypatch):
    handed = []

    def load_model(path, networks=None):
        handed.append(str(path))
        raise weights.WeightsFileError("stop here")

    monkeypatch.setattr(pipeline, "load_model", load_model)
    arguments = [
        "--model",
        "gs://bucket/model",
        "--input",
        "digits",
        "--out",
        str(tmp_path / "data"),
        "--resolution",
        "32",
    ]
    assert prepare_data.main(arguments) == 2
    assert handed == ["gs://bucket/model"]
