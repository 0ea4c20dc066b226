"""python -m perflow_jax.export --to-torch: diffusers folders that hold exactly the trained student."""

import json
import os
import shutil
import stat
from pathlib import Path

import diffusers
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from perflow_jax import checkpoint, export, pipeline, sampler, weights
from perflow_jax.convert import convert
from perflow_jax.export import ExportError, export_to_torch
from tests.helpers.parity import relative_error
from tests.helpers.pipelines import quiet, tiny_model_and_data, tiny_pipeline, tiny_workdir

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run's WORKDIR with checkpoints at steps 1 and 2, its teacher's diffusers and converted folders."""
    root = tmp_path_factory.mktemp("export")
    diffusers_dir, model, data_dir = tiny_model_and_data(root)
    return tiny_workdir(root / "work", model, data_dir, steps=(1, 2)), diffusers_dir, model


def torch_state(folder: Path, dtype=torch.float32) -> dict[str, np.ndarray]:
    unet = diffusers.UNet2DConditionModel.from_pretrained(folder, torch_dtype=dtype)
    return {k: v.float().numpy() if dtype != torch.float32 else v.numpy() for k, v in unet.state_dict().items()}


def ema_state(workdir: Path, step: int | None = None) -> dict[str, np.ndarray]:
    return weights.params_to_state_dict(checkpoint.trained_unet(workdir, step=step)[1])


def assert_sum_rounds_to(merged: np.ndarray, expected: np.ndarray, base: np.ndarray) -> None:
    """(student - teacher) + teacher in float32 is the student up to one rounding of the sum (1 ulp)."""
    bound = np.spacing(np.maximum(np.abs(expected), np.abs(base)).astype(np.float32))
    assert np.all(np.abs(merged - expected) <= bound)


def test_exported_unet_loads_in_diffusers_with_the_ema_weights_exactly(run, tmp_path):
    workdir, _, _ = run
    export_to_torch(workdir, tmp_path / "out", dtype="float32", log=quiet)
    expected, loaded = ema_state(workdir), torch_state(tmp_path / "out/unet")
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        np.testing.assert_array_equal(loaded[key], value, err_msg=key)


def test_float16_export_is_the_cast_of_the_weights(run, tmp_path):
    workdir, _, _ = run
    export_to_torch(workdir, tmp_path / "out", log=quiet)  # float16 by default
    loaded = torch_state(tmp_path / "out/unet", torch.float16)
    for key, value in ema_state(workdir).items():
        np.testing.assert_array_equal(loaded[key], value.astype(np.float16).astype(np.float32), err_msg=key)


def test_student_weights_and_an_older_step_are_exported_on_request(run, tmp_path):
    workdir, _, _ = run
    export_to_torch(workdir, tmp_path / "out", step=1, weights="student", dtype="float32", log=quiet)
    _, student, _ = checkpoint.trained_unet(workdir, step=1, weights="student")
    loaded = torch_state(tmp_path / "out/unet")
    for key, value in weights.params_to_state_dict(student).items():
        np.testing.assert_array_equal(loaded[key], value, err_msg=key)
    assert any(not np.array_equal(loaded[k], v) for k, v in ema_state(workdir).items())


def test_delta_is_student_minus_teacher_for_every_unet_key(run, tmp_path):
    workdir, teacher_diffusers, _ = run
    export_to_torch(workdir, tmp_path / "out", dtype="float32", log=quiet)
    delta = load_file(str(tmp_path / "out" / export.DELTA_FILE))
    teacher, student = torch_state(teacher_diffusers / "unet"), ema_state(workdir)
    assert delta.keys() == student.keys() and all(d.dtype == np.float32 for d in delta.values())
    np.testing.assert_array_equal(delta["conv_in.weight"], student["conv_in.weight"] - teacher["conv_in.weight"])
    assert max(float(np.abs(d).max()) for d in delta.values()) > 1e-3  # the student moved


def test_base_plus_delta_with_the_torch_loader_equals_the_exported_unet(run, tmp_path):
    from perflow_jax.torch import merge_delta_weights

    workdir, teacher_diffusers, _ = run
    export_to_torch(workdir, tmp_path / "out", dtype="float32", log=quiet)
    base = diffusers.UNet2DConditionModel.from_pretrained(teacher_diffusers / "unet")
    teacher = {k: v.numpy().copy() for k, v in base.state_dict().items()}
    merged = merge_delta_weights(base, tmp_path / "out" / export.DELTA_FILE).state_dict()
    for key, value in torch_state(tmp_path / "out/unet").items():
        assert_sum_rounds_to(merged[key].numpy(), value, teacher[key])


def test_delta_imported_by_convert_reproduces_the_student(run, tmp_path):
    workdir, teacher_diffusers, _ = run
    export_to_torch(workdir, tmp_path / "out", dtype="float32", log=quiet)
    convert(teacher_diffusers, tmp_path / "merged", perflow_delta=tmp_path / "out" / export.DELTA_FILE, log=quiet)
    merged = weights.params_to_state_dict(weights.read_component(tmp_path / "merged", "unet")[2])
    teacher = torch_state(teacher_diffusers / "unet")
    for key, value in ema_state(workdir).items():
        assert_sum_rounds_to(merged[key], value, teacher[key])


def test_scheduler_config_names_the_runs_parameterization_windows_and_betas(run, tmp_path):
    workdir, teacher_diffusers, _ = run
    export_to_torch(workdir, tmp_path / "out", log=quiet)
    config = json.loads((tmp_path / "out/scheduler/scheduler_config.json").read_text())
    teacher = json.loads((teacher_diffusers / "scheduler/scheduler_config.json").read_text())
    assert config["_class_name"] == "PeRFlowScheduler"
    assert (config["prediction_type"], config["num_time_windows"]) == ("diff_eps", 4)
    assert [config[k] for k in ("beta_start", "beta_end", "beta_schedule")] == [
        teacher[k] for k in ("beta_start", "beta_end", "beta_schedule")
    ]


def test_with_base_the_folder_is_a_whole_pipeline_naming_the_perflow_scheduler(run, tmp_path):
    workdir, teacher_diffusers, _ = run
    export_to_torch(workdir, tmp_path / "out", base=teacher_diffusers, log=quiet)
    index = json.loads((tmp_path / "out/model_index.json").read_text())
    assert index["scheduler"] == ["perflow_jax.torch.scheduler", "PeRFlowScheduler"]
    assert index["_class_name"] == "StableDiffusionPipeline"
    for part in ("vae", "text_encoder", "tokenizer"):
        assert sorted(p.name for p in (tmp_path / "out" / part).iterdir()) == sorted(
            p.name for p in (teacher_diffusers / part).iterdir()
        )


def test_a_converted_perflow_folder_exports_and_takes_its_delta_from_the_base(run, tmp_path):
    workdir, teacher_diffusers, _ = run
    export_to_torch(workdir, tmp_path / "first", dtype="float32", base=teacher_diffusers, log=quiet)
    convert(tmp_path / "first", tmp_path / "converted", log=quiet)
    export_to_torch(tmp_path / "converted", tmp_path / "again", dtype="float32", base=teacher_diffusers, log=quiet)
    for name in ("unet/diffusion_pytorch_model.safetensors", export.DELTA_FILE):
        first, again = load_file(str(tmp_path / "first" / name)), load_file(str(tmp_path / "again" / name))
        assert first.keys() == again.keys()
        for key in first:
            np.testing.assert_array_equal(first[key], again[key], err_msg=f"{name}: {key}")


# ---- errors: each names the problem and the fix, and leaves nothing behind -----------------


def assert_fails_cleanly(out: Path, message: str, model, **kwargs):
    before = sorted(p.name for p in out.parent.iterdir())
    with pytest.raises((ExportError, checkpoint.CheckpointError, weights.WeightsFileError), match=message):
        export_to_torch(model, out, log=quiet, **kwargs)
    assert sorted(p.name for p in out.parent.iterdir()) == before  # nothing written, no staging folder left


def test_a_non_empty_out_is_refused_without_overwrite(run, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out/keep.txt").write_text("mine")
    assert_fails_cleanly(tmp_path / "out", "exists and is not empty.*--overwrite", run[0])
    assert (tmp_path / "out/keep.txt").read_text() == "mine"
    export_to_torch(run[0], tmp_path / "out", overwrite=True, log=quiet)
    assert not (tmp_path / "out/keep.txt").exists() and (tmp_path / "out/unet/config.json").is_file()


def test_a_step_without_checkpoint_is_refused_listing_the_saved_ones(run, tmp_path):
    assert_fails_cleanly(tmp_path / "out", r"no checkpoint of step 7; it has steps 1, 2", run[0], step=7)


def test_a_workdir_without_checkpoints_is_refused(tmp_path):
    (tmp_path / "work/checkpoints").mkdir(parents=True)
    assert_fails_cleanly(tmp_path / "out", "has no checkpoints yet.*train first", tmp_path / "work")


def test_a_plain_stable_diffusion_folder_is_refused(run, tmp_path):
    assert_fails_cleanly(tmp_path / "out", "not a PeRFlow student", run[2])


def test_step_or_weights_with_a_model_folder_are_refused(run, tmp_path):
    assert_fails_cleanly(tmp_path / "out", "not a training run's WORKDIR", run[2], weights="student")


def test_a_base_of_another_architecture_is_refused(run, tmp_path):
    tiny_pipeline(tmp_path / "sources", xl=True).save_pretrained(tmp_path / "xl")
    assert_fails_cleanly(tmp_path / "out", "another UNet architecture", run[0], base=tmp_path / "xl")


def test_an_out_over_an_input_is_refused_and_the_input_kept(run, tmp_path):
    workdir, diffusers_dir, teacher = run
    before = sorted(p.name for p in workdir.iterdir())
    for out, flag, model, base in [
        (workdir, "--model", workdir, None),
        (workdir / "export", "--model", workdir, None),
        (diffusers_dir / "unet", "--base", workdir, diffusers_dir),
        (teacher, r"the teacher folder \(config.model.path\)", workdir, None),
    ]:
        with pytest.raises(ExportError, match=f"--out {out} (is|contains|lies inside) {flag} .*, which this command"):
            export_to_torch(model, out, base=base, overwrite=True, log=quiet)
    assert sorted(p.name for p in workdir.iterdir()) == before and (teacher / "unet/config.json").is_file()


def test_cli_exports_and_reports_errors_with_exit_status_2(run, tmp_path, capsys, caplog):
    assert export.main(["--to-torch", "--model", str(run[0]), "--out", str(tmp_path / "out")]) == 0
    assert [record.getMessage() for record in caplog.records if record.name == "absl"] == []  # Orbax's: on --verbose
    assert (tmp_path / "out/unet/diffusion_pytorch_model.safetensors").is_file()
    umask = os.umask(0o022)
    os.umask(umask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert modes[export.DELTA_FILE] == modes["diffusion_pytorch_model.safetensors"] == 0o666 & ~umask
    assert set(modes.values()) == {0o666 & ~umask}  # like every other file written
    assert export.main(["--to-torch", "--model", str(run[0]), "--out", str(tmp_path / "out")]) == 2
    assert "--overwrite" in capsys.readouterr().err


# ---- the export samples in stock diffusers as this project's sampler does in JAX ------------


def perflow_folder(teacher_diffusers: Path, folder: Path, parameterization: str) -> Path:
    """The teacher's diffusers folder with a PeRFlowScheduler of ``parameterization``: a "student"."""
    shutil.copytree(teacher_diffusers, folder)
    schedule = json.loads((teacher_diffusers / "scheduler/scheduler_config.json").read_text())
    config = pipeline.perflow_scheduler_config(schedule, parameterization, 4)
    (folder / "scheduler/scheduler_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("parameterization", ["velocity", "ddim_eps", "diff_eps"])
def test_diffusers_pipeline_with_the_export_reaches_the_jax_samplers_latents(run, tmp_path, parameterization):
    import perflow_jax.torch  # noqa: F401  (diffusers finds PeRFlowScheduler among the imported modules)

    _, teacher_diffusers, _ = run
    student = perflow_folder(teacher_diffusers, tmp_path / "student", parameterization)
    export_to_torch(student, tmp_path / "out", dtype="float32", base=teacher_diffusers, log=quiet)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "out")
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == "PeRFlowScheduler"
    assert pipe.scheduler.config.prediction_type == parameterization

    trained = pipeline.load_trained(tmp_path / "out", networks=())
    num_windows = trained.description.perflow[1]
    unet = trained.model.module("unet")
    apply = pipeline.unet_apply(unet, trained.model.params["unet"])
    ab = trained.model.alphas_cumprod()
    tokens = pipe.tokenizer(
        ["a photo number 3", "a red car", ""], padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        embeddings = pipe.text_encoder(tokens)[0]
    prompts, negative = embeddings[:2], embeddings[2:].expand(2, -1, -1)
    noise = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    for num_steps in (4, 6):
        for guidance in (1.0, 4.5):
            with torch.no_grad():
                expected = pipe(
                    prompt_embeds=prompts,
                    negative_prompt_embeds=negative,
                    latents=noise.clone(),
                    height=32,
                    width=32,
                    num_inference_steps=num_steps,
                    guidance_scale=guidance,
                    output_type="latent",
                ).images.numpy()
            latents = sampler.sample(
                apply,
                jnp.asarray(noise.numpy().transpose(0, 2, 3, 1)),
                {"encoder_hidden_states": jnp.asarray(prompts.numpy())},
                {"encoder_hidden_states": jnp.asarray(negative.numpy())},
                ab,
                num_steps=num_steps,
                num_windows=num_windows,
                parameterization=parameterization,
                guidance=guidance,
            )
            got = np.asarray(latents).transpose(0, 3, 1, 2)
            error = np.linalg.norm(got - expected) / np.linalg.norm(expected)
            print(f"{parameterization} N={num_steps} w={guidance}: relative error {error:.2e}")
            assert error < 1e-5, (num_steps, guidance, error)


def test_sdxl_export_with_base_samples_in_diffusers_as_in_jax(tmp_path):
    """SDXL (two text encoders, pooled text and size ids): the exported pipeline and the JAX sampler agree."""
    import perflow_jax.torch  # noqa: F401  (diffusers finds PeRFlowScheduler among the imported modules)

    tiny_pipeline(tmp_path / "sources", xl=True).save_pretrained(tmp_path / "xl")
    student = perflow_folder(tmp_path / "xl", tmp_path / "student", "ddim_eps")
    export_to_torch(student, tmp_path / "out", dtype="float32", base=tmp_path / "xl", log=quiet)
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(tmp_path / "out")
    pipe.set_progress_bar_config(disable=True)
    assert json.loads((tmp_path / "out/model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"

    trained = pipeline.load_trained(tmp_path / "out", networks=())
    parameterization, num_windows = trained.description.perflow
    apply = pipeline.unet_apply(trained.model.module("unet"), trained.model.params["unet"])
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompt=["a photo number 3", "a red car"],
            device="cpu",
            num_images_per_prompt=1,
            do_classifier_free_guidance=True,
            negative_prompt=["", ""],
        )
    time_ids = jnp.asarray([[32, 32, 0, 0, 32, 32]] * 2, jnp.float32)  # original size, crop, target size

    def cond(states, pooled_states):
        return {
            "encoder_hidden_states": jnp.asarray(states.numpy()),
            "text_embeds": jnp.asarray(pooled_states.numpy()),
            "time_ids": time_ids,
        }

    noise = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    for guidance in (1.0, 2.0):
        with torch.no_grad():
            expected = pipe(
                prompt_embeds=embeds,
                negative_prompt_embeds=negative,
                pooled_prompt_embeds=pooled,
                negative_pooled_prompt_embeds=negative_pooled,
                latents=noise.clone(),
                height=32,
                width=32,
                num_inference_steps=4,
                guidance_scale=guidance,
                output_type="latent",
            ).images.numpy()
        latents = sampler.sample(
            apply,
            jnp.asarray(noise.numpy().transpose(0, 2, 3, 1)),
            cond(embeds, pooled),
            cond(negative, negative_pooled),
            trained.model.alphas_cumprod(),
            num_steps=4,
            num_windows=num_windows,
            parameterization=parameterization,
            guidance=guidance,
        )
        error = relative_error(np.asarray(latents).transpose(0, 3, 1, 2), expected)
        print(f"SDXL ddim_eps N=4 w={guidance}: relative error {error:.2e}")
        assert error < 1e-5, (guidance, error)
