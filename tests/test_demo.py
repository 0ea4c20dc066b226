"""make demo's pieces, in order, on the embedded digits teacher, with a short training run."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import diffusers
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
from PIL import Image

from perflow_jax import export, lora, pipeline, sample, weights
from perflow_jax.convert import convert
from perflow_jax.demo import TEACHER, digits
from perflow_jax.models.unet import UNet2DConditionModel, UNetConfig
from perflow_jax.prepare_data import prepare
from perflow_jax.training import train_and_evaluate
from tests.helpers.parity import FLOAT32_NETWORK_RTOL, flax_args, random_inputs, relative_error
from tests.helpers.pipelines import quiet
from tests.helpers.processes import library_logs
from tests.helpers.recipes import load

ROOT = Path(__file__).resolve().parents[1]
PER_DIGIT = 10


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """runs/demo as make demo leaves it, after 4 training steps instead of the config's 400."""
    root = tmp_path_factory.mktemp("demo")
    convert(TEACHER, root / "teacher", log=quiet)
    prepare(root / "teacher", "digits", root / "data", resolution=digits.RESOLUTION, progress=False)
    config = load("demo")
    config.model.path, config.data.path = str(root / "teacher"), str(root / "data")
    config.train.num_steps, config.train.global_batch_size = 4, 16
    config.log.every_steps, config.log.eval_every_steps, config.checkpoint.every_steps = 2, 4, 4
    train_and_evaluate(config, root / "work")
    export.export_to_torch(root / "work", root / "torch", base=TEACHER, dtype="float32", log=quiet)
    return root


def test_the_prepared_data_is_the_train_split_of_the_digits(demo):
    manifest = json.loads((demo / "data/manifest.json").read_text())
    assert manifest["count"] == len(digits.load("train")[1]) == 1198
    assert manifest["resolution"] == 32


def test_training_writes_checkpoint_metrics_and_the_grid_of_every_digit(demo):
    rows = [json.loads(line) for line in (demo / "work/metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [2, 4] and all(np.isfinite(row["loss"]) for row in rows)
    assert (demo / "work/checkpoints/4").is_dir()
    grid = Image.open(demo / "work/samples/step_000004.png")
    assert grid.size == (4 * 32, 3 * 32)  # ten digits, ceil(sqrt(10)) = 4 columns


def test_sample_cli_draws_a_row_per_digit(demo, tmp_path):
    out = tmp_path / "digits.png"
    code = sample.main(["--model", str(demo / "work"), "--prompts", str(ROOT / "perflow_jax/demo/prompts.txt"),
                        "--steps", "4", "--num-images", "3", "--out", str(out)])  # fmt: skip
    assert code == 0
    assert (ROOT / "perflow_jax/demo/prompts.txt").read_text().splitlines() == [digits.caption(d) for d in range(10)]
    assert Image.open(out).size == (6 * 32, 5 * 32)  # 30 images, ceil(sqrt(30)) = 6 columns


@pytest.fixture(scope="module")
def table(demo):
    """bench/quality.py on the demo's outputs, PER_DIGIT images per digit."""
    out = demo / "quality.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench/quality.py"), "--teacher", str(demo / "teacher"), "--workdir",
         str(demo / "work"), "--export", str(demo / "torch"), "--out", str(out), "--per-digit", str(PER_DIGIT)],
        capture_output=True, text=True, cwd=ROOT, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text()), result


def test_quality_table_has_every_row_and_writes_grids(table, demo):
    report, result = table
    names = [row["sampler"] for row in report["rows"]]
    assert names == ["teacher DDIM 1 step"] + [f"teacher DDIM {n} steps" for n in (2, 4, 8, 50)] + [
        "PeRFlow 4 steps", "PeRFlow 8 steps", "PeRFlow 4 steps, PyTorch export",
    ]  # fmt: skip
    assert "| teacher DDIM 50 steps |" in result.stdout and report["verdict"] in result.stdout
    assert library_logs(result.stderr) == []  # Orbax's routine warnings: on --verbose
    assert len(list((demo / "quality").rglob("*.png"))) == len(names)  # evaluate's grid of each row


def test_the_embedded_teacher_draws_the_digits_it_is_asked_for(table):
    rows = {row["sampler"]: row for row in table[0]["rows"]}
    # Without guidance (configs/demo.py) the classifier recognised 90% of the teacher's 50-step digits
    # (500 images, bench/RESULTS.md); chance is 10%. 100 images here: 0.8 leaves 3 standard errors.
    assert rows["teacher DDIM 50 steps"]["accuracy"] >= 0.8
    assert all(0 < row["frechet_distance"] < 100 for row in rows.values())


def test_the_pytorch_export_scores_as_the_jax_student(table):
    rows = {row["sampler"]: row for row in table[0]["rows"]}
    jax_row, torch_row = rows["PeRFlow 4 steps"], rows["PeRFlow 4 steps, PyTorch export"]
    # Same noise, same float32 networks: the images agree to ~1e-6, so the classifier agrees too.
    assert torch_row["accuracy"] == jax_row["accuracy"]
    assert torch_row["frechet_distance"] == pytest.approx(jax_row["frechet_distance"], rel=1e-3)


def test_sample_on_the_demo_student_is_seeded_and_honours_init_noise(demo, tmp_path):
    prompts = [digits.caption(d) for d in range(10)]

    def run(name, **options):
        return sample.sample(sample.Options(demo / "work", prompts, tmp_path / name, guidance=1.0, **options), quiet)

    first = run("a.png", seed=3, save_noise=tmp_path / "noise.npy")
    again = run("b.png", seed=3)
    other = run("c.png", seed=4)
    given = run("d.png", init_noise=tmp_path / "noise.npy")
    np.testing.assert_array_equal(again.images, first.images)
    np.testing.assert_array_equal(given.images, first.images)
    assert np.abs(other.images - first.images).mean() > 0.01


def test_fewer_steps_than_the_demo_students_windows_are_refused(demo, tmp_path):
    with pytest.raises(ValueError, match="every window needs at least one step, so use 4 or more"):
        sample.sample(sample.Options(demo / "work", ["a handwritten digit one"], tmp_path / "x.png", steps=2), quiet)


# --- the demo's LoRA variant: --config.model.lora_rank=8 ----------------------------------------


@pytest.fixture(scope="module")
def lora_demo(demo):
    """The demo's LoRA variant trained 4 steps (checkpoints at 2 and 4), and a copy resumed from step 2."""
    config = load("demo")
    config.model.path, config.data.path = str(demo / "teacher"), str(demo / "data")
    config.model.lora_rank = 8
    config.train.num_steps, config.train.global_batch_size = 4, 16
    config.log.every_steps, config.log.eval_every_steps, config.checkpoint.every_steps = 2, 4, 2
    train_and_evaluate(config, demo / "lora")
    shutil.copytree(
        demo / "lora",
        demo / "lora_resumed",
        ignore=lambda folder, names: ["4"] if folder.endswith("checkpoints") else [],
    )
    train_and_evaluate(config, demo / "lora_resumed")
    return demo


def saved_state(workdir: Path, step: int) -> dict:
    with ocp.CheckpointManager(workdir.absolute() / "checkpoints") as manager:
        return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]


def test_a_lora_run_checkpoints_only_the_adapters_and_resumes_as_one_uninterrupted(lora_demo):
    straight, resumed = saved_state(lora_demo / "lora", 4), saved_state(lora_demo / "lora_resumed", 4)
    assert straight["ema_params"] is None  # no EMA with LoRA, as the authors' LoRA script
    keys = list(weights.flatten(straight["params"]))
    assert keys and all(k.endswith((".lora_A.kernel", ".lora_B.kernel")) for k in keys)
    assert any(np.abs(v).max() > 0 for k, v in weights.flatten(straight["params"]).items() if ".lora_B." in k)
    for key in ("params", "opt_state"):
        for x, y in zip(jax.tree.leaves(straight[key]), jax.tree.leaves(resumed[key]), strict=True):
            np.testing.assert_array_equal(x, y)
    rows = [json.loads(line) for line in (lora_demo / "lora_resumed/metrics.jsonl").read_text().splitlines()]
    straight_rows = [json.loads(line) for line in (lora_demo / "lora/metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows] == [r["loss"] for r in straight_rows]


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_a_lora_export_loads_in_diffusers_as_the_jax_lora_student(lora_demo, fmt, tmp_path):
    export.export_to_torch(
        lora_demo / "lora", tmp_path / "out", lora_format=fmt, merge=True, dtype="float32", log=quiet
    )
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "delta_weights.safetensors",
        "pytorch_lora_weights.safetensors",
        "scheduler",
        "unet",
    ]
    trained = pipeline.load_trained(lora_demo / "lora", networks=())
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(TEACHER)
    pipe.load_lora_weights(tmp_path / "out")
    pipe.fuse_lora()
    inputs = random_inputs(pipe.unet, batch=2, size=8)
    with torch.no_grad():
        expected = pipe.unet(**inputs).sample.numpy()
    module = UNet2DConditionModel(UNetConfig.from_dict(dict(pipe.unet.config)))
    actual = jax.jit(module.apply)({"params": trained.model.params["unet"]}, *flax_args(inputs))
    assert relative_error(np.transpose(np.asarray(actual), (0, 3, 1, 2)), expected) < FLOAT32_NETWORK_RTOL
    merged = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "out/unet")
    with torch.no_grad():
        assert relative_error(merged(**inputs).sample.numpy(), expected) < FLOAT32_NETWORK_RTOL


def test_convert_and_sample_merge_a_lora_file_at_its_scale(lora_demo, tmp_path):
    export.export_to_torch(lora_demo / "lora", tmp_path / "adapter", log=quiet)
    file = tmp_path / "adapter" / lora.LORA_FILE
    convert(lora_demo / "torch", tmp_path / "converted", lora=[f"{file}:0.5"], log=quiet)
    plain = pipeline.load_model(lora_demo / "torch", networks=("unet",)).params["unet"]
    merged = pipeline.load_model(tmp_path / "converted", networks=("unet",)).params["unet"]
    adapters, scales = lora.read(file, plain)
    expected = lora.merge(plain, adapters, {module: 0.5 * s for module, s in scales.items()})
    changed = 0
    for key, value in weights.flatten(merged).items():
        np.testing.assert_array_equal(value, weights.flatten(expected)[key])
        changed += not np.array_equal(value, weights.flatten(plain)[key])
    assert changed == len(scales) > 0
    prompts = [digits.caption(d) for d in range(3)]
    options = dict(prompts=prompts, guidance=1.0, seed=1)
    with_lora = sample.sample(
        sample.Options(lora_demo / "torch", out=tmp_path / "a.png", lora=(f"{file}:0.5",), **options), quiet
    )
    converted = sample.sample(sample.Options(tmp_path / "converted", out=tmp_path / "b.png", **options), quiet)
    np.testing.assert_allclose(with_lora.images, converted.images, rtol=0, atol=1e-6)


def test_diffusers_with_the_exported_lora_fused_gives_the_jax_samplers_final_latents(lora_demo, tmp_path):
    """Stock diffusers: the teacher pipeline, the exported LoRA loaded and fused, the exported PeRFlow
    scheduler; 4 steps from the same noise give the JAX sampler's final latents (float32, < 1e-5)."""
    import perflow_jax.torch  # noqa: F401  (diffusers finds PeRFlowScheduler among the imported modules)

    export.export_to_torch(lora_demo / "lora", tmp_path / "out", dtype="float32", log=quiet)
    prompts = [digits.caption(d) for d in (3, 7)]
    jax_run = sample.sample(
        sample.Options(lora_demo / "lora", prompts, tmp_path / "jax.png", guidance=1.0, seed=2,
                       save_noise=tmp_path / "noise.npy", save_latents=tmp_path / "latents.npy"),
        quiet,
    )  # fmt: skip
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(TEACHER, torch_dtype=torch.float32)
    pipe.scheduler = perflow_jax.torch.PeRFlowScheduler.from_pretrained(tmp_path / "out/scheduler")
    pipe.load_lora_weights(tmp_path / "out")
    pipe.fuse_lora()
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        expected = pipe(
            prompts, latents=torch.from_numpy(np.load(tmp_path / "noise.npy")), num_inference_steps=4,
            guidance_scale=1.0, height=digits.RESOLUTION, width=digits.RESOLUTION, output_type="latent",
        ).images.numpy()  # fmt: skip
    assert jax_run.images.shape[0] == 2
    error = relative_error(np.load(tmp_path / "latents.npy"), expected)
    print(f"LoRA export in diffusers vs the JAX sampler, final latents: relative error {error:.1e}")
    assert error < 1e-5
