"""launch/colab_demo.ipynb runs end to end in a Jupyter kernel, offline, on the embedded digits model.

The notebook is executed once (nbclient + ipykernel, in a temporary working directory) with
PERFLOW_NOTEBOOK_OFFLINE=1 and HF_HUB_OFFLINE=1, as CI has no model hub: it must skip the install,
take the embedded teacher and delta (perflow_jax.demo.TEACHER, DELTA), convert them to a PeRFlow
student and sample the ten digit captions in 4 steps, then the teacher's 4-step DDIM. A probe cell
appended to the in-memory copy saves the images the kernel holds, for the assertions below.
"""

import os
from pathlib import Path
from unittest import mock

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient
from PIL import Image

from perflow_jax import image_io

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "launch" / "colab_demo.ipynb"
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
    with mock.patch.dict(os.environ, {"PERFLOW_NOTEBOOK_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}):
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
