"""launch/colab_demo.ipynb runs end to end in a Jupyter kernel, offline, on the embedded digits model.

The notebook is executed once (nbclient + ipykernel, in a temporary working directory) with
PERFLOW_NOTEBOOK_OFFLINE=1 and HF_HUB_OFFLINE=1, as CI has no model hub: it must skip the install,
distil the digits teacher (2 steps here, the quality table on 1 image per digit and sampler), take
the embedded teacher and delta (perflow_jax.demo.TEACHER, DELTA), convert them to a PeRFlow student
and sample the ten digit captions in 4 steps, then the teacher's 4-step DDIM. A probe cell appended
to the in-memory copy saves the images the kernel holds, for the assertions below. The install
cell's rule (launch/colab_install.py) is tested against a made-up runtime.
"""

import importlib.util
import json
import os
from pathlib import Path
from unittest import mock

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient
from PIL import Image

from perflow_jax import image_io, recipe

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "launch" / "colab_demo.ipynb"
colab_install = recipe.config_module(ROOT / "launch" / "colab_install.py")
TRAIN_STEPS = 2
DIGITS, SIZE = 10, 32  # the ten captions of perflow_jax/demo/prompts.txt, 32 px images
GRID_COLUMNS = 4  # image_io.grid's default for 10 images: ceil(sqrt(10)) columns, 3 rows
PROBE = """\
np.save("probe_student.npy", student.images)
np.save("probe_teacher.npy", teacher.images)
print(f"probe: MODEL_SOURCE={MODEL_SOURCE}")
"""
# Images are float32 in [0, 1]. A flat image has a standard deviation of 0; a 32 px digit (white
# strokes on black over about a fifth of the image) about 0.4. 0.05 is far above the first and below
# any image that shows a shape; the same bound on the mean absolute difference tells images apart.
MIN_IMAGE_STD = 0.05
MIN_IMAGE_DIFFERENCE = 0.05


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, nbformat.NotebookNode]:
    """(working directory, executed notebook) of one offline run; a failing cell fails every test here."""
    workdir = tmp_path_factory.mktemp("colab_demo")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    notebook.cells.append(nbformat.v4.new_code_cell(PROBE))
    # The kernel is a child process of this one and inherits its environment at start.
    offline = {"PERFLOW_NOTEBOOK_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    quick = {"PERFLOW_NOTEBOOK_TRAIN_STEPS": str(TRAIN_STEPS), "PERFLOW_NOTEBOOK_PER_DIGIT": "1"}
    with mock.patch.dict(os.environ, {**offline, **quick}):
        client = NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": workdir}})
        client.execute()
    return workdir, notebook


def printed(notebook: nbformat.NotebookNode) -> str:
    """Everything the code cells printed to stdout, in order."""
    return "".join(
        output.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "stream" and output.name == "stdout"
    )


def test_committed_notebook_has_no_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code
    assert [(cell.outputs, cell.execution_count) for cell in code] == [([], None)] * len(code)


def test_install_is_skipped_where_perflow_jax_is_importable(run):
    _, notebook = run
    assert "perflow_jax is importable already: nothing to install" in printed(notebook)


def test_offline_run_takes_the_embedded_model(run):
    _, notebook = run
    text = printed(notebook)
    assert "PERFLOW_NOTEBOOK_OFFLINE=1: the hub is not tried" in text
    assert "model source: embedded" in text
    assert "probe: MODEL_SOURCE=embedded" in text


def test_teacher_plus_delta_converts_to_a_diff_eps_student_with_4_windows(run):
    _, notebook = run
    assert "converted/digits-perflow is a PeRFlow student: it predicts diff_eps in 4 time windows" in printed(notebook)


def test_student_grid_png_holds_the_ten_4_step_digits(run):
    workdir, _ = run
    student = np.load(workdir / "probe_student.npy")
    assert student.shape == (DIGITS, SIZE, SIZE, 3)
    png = np.asarray(Image.open(workdir / "perflow_4_steps.png"))
    assert png.shape == (3 * SIZE, GRID_COLUMNS * SIZE, 3)
    np.testing.assert_array_equal(png, image_io.grid(student))


def test_student_images_are_neither_blank_nor_all_alike(run):
    workdir, _ = run
    x = np.load(workdir / "probe_student.npy").astype(np.float64)
    assert np.all(np.isfinite(x)) and x.min() >= 0.0 and x.max() <= 1.0
    stds = x.std(axis=(1, 2, 3))
    assert stds.min() > MIN_IMAGE_STD, stds
    differences = np.abs(x[:, None] - x[None]).mean(axis=(2, 3, 4))[~np.eye(DIGITS, dtype=bool)]
    assert differences.min() > MIN_IMAGE_DIFFERENCE, differences


def test_comparison_png_puts_the_student_above_the_teachers_ddim(run):
    workdir, _ = run
    student, teacher = np.load(workdir / "probe_student.npy"), np.load(workdir / "probe_teacher.npy")
    assert teacher.shape == (DIGITS, SIZE, SIZE, 3)
    png = np.asarray(Image.open(workdir / "comparison.png"))
    assert png.shape == (2 * SIZE, DIGITS * SIZE, 3)
    np.testing.assert_array_equal(png[:SIZE], image_io.grid(student, columns=DIGITS))
    np.testing.assert_array_equal(png[SIZE:], image_io.grid(teacher, columns=DIGITS))


def test_the_digits_teacher_is_distilled_with_its_grids_and_quality_table(run):
    workdir, notebook = run
    samples = workdir / "demo" / "work" / "samples"
    assert (samples / "teacher_ddim.png").is_file() and (samples / f"step_{TRAIN_STEPS:06d}.png").is_file()
    table = json.loads((workdir / "demo" / "quality.json").read_text())
    assert [row["sampler"] for row in table["rows"]][-2:] == ["PeRFlow 4 steps", "PeRFlow 8 steps"]
    assert f"step {TRAIN_STEPS}/{TRAIN_STEPS} | loss" in printed(notebook)


def test_an_empty_repository_url_stops_the_install_with_what_to_fill_in():
    cells = nbformat.read(NOTEBOOK, as_version=4).cells
    install = next(cell.source for cell in cells if cell.get("id") == "install")
    settings = next(cell.source for cell in cells if cell.get("id") == "settings")
    assert 'REPO_URL = ""  # @param {type:"string"}' in settings
    not_installed = mock.patch.object(importlib.util, "find_spec", return_value=None)
    with not_installed, pytest.raises(ValueError, match="REPO_URL is empty: fill in the form field"):
        exec(install, {"REPO_URL": "  ", "importlib": importlib, "Path": Path})


# A Colab TPU runtime as it comes (made-up versions): its own jax, jaxlib, libtpu and numpy, an old flax.
COLAB = {"jax": "0.12.0", "jaxlib": "0.12.0", "libtpu": "0.0.47", "numpy": "2.0.2", "flax": "0.10.4",
         "transformers": "5.30.1", "pillow": "11.1.0", "absl-py": "1.4.0", "tqdm": "4.67.1"}  # fmt: skip


def test_the_install_keeps_the_runtimes_jax_jaxlib_libtpu_and_numpy_and_adds_only_what_is_missing():
    requirements = (ROOT / "requirements-tpu.txt").read_text().splitlines()
    allowed = colab_install.ranges(ROOT / "setup.cfg")
    wanted = colab_install.to_install(requirements, allowed, COLAB, "3.12")
    assert wanted[-4:] == ["jax==0.12.0", "jaxlib==0.12.0", "libtpu==0.0.47", "numpy==2.0.2"]  # pinned as they are
    added = wanted[:-4]
    assert not [r for r in added if r.partition("=")[0].partition("[")[0] in colab_install.PRESERVED]
    assert "flax==0.12.12" in added  # 0.10.4 is outside setup.cfg's range
    assert not [r for r in added if r.startswith(("transformers", "pillow", "absl-py", "tqdm"))]  # in range: kept
    assert "grain==0.2.18" in added and "orbax-checkpoint==0.12.8" in added  # missing
    complete = {**COLAB, **{r.partition("==")[0]: r.partition("==")[2] for r in added}}
    assert colab_install.to_install(requirements, allowed, complete, "3.12") == []


def test_a_runtime_jax_outside_the_range_stops_the_install_naming_it():
    requirements = (ROOT / "requirements-tpu.txt").read_text().splitlines()
    with pytest.raises(ValueError, match=r"this runtime has jax 0.13.0, outside perflow_jax's range"):
        colab_install.to_install(
            requirements, colab_install.ranges(ROOT / "setup.cfg"), {**COLAB, "jax": "0.13.0"}, "3.12"
        )


def test_the_project_goes_in_without_its_dependencies(tmp_path):
    commands = colab_install.pip_commands(ROOT, "python")
    assert commands[-1] == ["python", "-m", "pip", "install", "--quiet", "--no-deps", "-e", str(ROOT)]
