"""configs/*.py and perflow_jax.recipe: the released recipes, comments on every value, validation messages."""

from __future__ import annotations

import ast
import dataclasses
import io
import tokenize

import ml_collections
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from perflow_jax import fid, recipe, step
from tests.helpers.recipes import CONFIGS, load

CONFIG_NAMES = ("sd15", "sd21", "sdxl", "tiny", "demo")
VARIANTS = ("sd21", "sdxl", "tiny", "demo")  # configs/sd15.py plus overrides

# PERFLOW_SPEC.md, "Released recipes".
RECIPES = {
    "sd15": dict(resolution=512, parameterization="diff_eps", K=4, S=8, guidance=1.0, M=1000, lr=8e-5,
                 prediction_type="epsilon"),
    "sd21": dict(resolution=768, parameterization="velocity", K=4, S=8, guidance=1.0, M=1000, lr=8e-5,
                 prediction_type="v_prediction"),
    "sdxl": dict(resolution=1024, parameterization="ddim_eps", K=4, S=10, guidance=7.5, M=200, lr=1e-4,
                 prediction_type="epsilon"),
}  # fmt: skip


def runnable(name: str = "tiny", **overrides) -> ml_collections.ConfigDict:
    """A config with its paths set, then ``overrides`` ("group.key": value) applied."""
    config = load(name)
    config.model.path = "/models/teacher"
    config.data.path = "/data/prepared"
    for key, value in overrides.items():
        group, field = key.split(".")
        config[group][field] = value
    return config


def problems(config: ml_collections.ConfigDict) -> str:
    with pytest.raises(recipe.ConfigError) as info:
        recipe.validate(config)
    return str(info.value)


SD_MANIFEST = {"resolution": 32, "tokenizers": ["input_ids"]}
XL_MANIFEST = {"resolution": 32, "tokenizers": ["input_ids", "input_ids_2"]}


def against(config, **overrides) -> None:
    kwargs = dict(cross_attention_dim=768, text_widths=[768], sdxl=False, manifest=SD_MANIFEST, device_count=8)
    recipe.validate_against(config, **{**kwargs, **overrides})


def against_problems(config, **overrides) -> str:
    with pytest.raises(recipe.ConfigError) as info:
        against(config, **overrides)
    return str(info.value)


# --- the config files ------------------------------------------------------------------------


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_every_config_passes_validation_once_paths_are_set(name):
    recipe.validate(runnable(name))


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_every_config_leaves_the_paths_to_the_user(name):
    config = load(name)
    assert config.model.path == "" and config.data.path == "" and config.model.student_init == ""


def test_folders_become_absolute_in_a_copy_and_an_empty_one_stays_empty(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = runnable(**{"model.path": "models/../teacher", "data.path": "/data/prepared"})
    resolved = recipe.with_absolute_paths(config)
    assert resolved.model.path == str(tmp_path / "teacher") and resolved.data.path == "/data/prepared"
    assert resolved.model.student_init == ""
    assert config.model.path == "models/../teacher"


def config_flat(config: ml_collections.ConfigDict, prefix: str = "") -> dict:
    flat = {}
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            flat.update(config_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def test_perflow_group_holds_exactly_the_step_settings():
    fields = {field.name for field in dataclasses.fields(step.PeRFlowSettings)}
    assert set(load("sd15").perflow.keys()) == fields


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_configs_hold_the_released_recipes(name):
    config, expected = load(name), RECIPES[name]
    assert config.data.resolution == expected["resolution"]
    assert config.perflow.parameterization == expected["parameterization"]
    assert (config.perflow.num_windows, config.perflow.solver_steps) == (expected["K"], expected["S"])
    assert config.perflow.teacher_guidance == expected["guidance"]
    assert config.perflow.discrete_timesteps == expected["M"]
    assert config.perflow.teacher_prediction_type == expected["prediction_type"]
    assert config.optim.lr == expected["lr"]
    assert config.perflow.text_dropout == 0.1
    assert config.perflow.ema_max_decay == 0.9999
    assert (config.optim.b1, config.optim.b2, config.optim.eps) == (0.9, 0.999, 1e-8)
    assert (config.optim.weight_decay, config.optim.grad_clip) == (1e-2, 1.0)
    assert (config.optim.schedule, config.optim.warmup_steps) == ("constant", 0)


def test_sd15_config_holds_the_reported_batch_and_released_sampling():
    config = load("sd15")
    assert config.train.global_batch_size == 1024
    assert (config.log.sample_steps, config.log.sample_guidance) == (4, 4.5)


def test_sdxl_config_rematerialises_accumulates_two_microbatches_and_samples_with_guidance_2():
    config = load("sdxl")
    assert config.model.remat == "full"
    assert config.train.gradient_accumulation_steps == 2  # the recipe's 8 x 2 per GPU
    assert config.log.sample_guidance == 2.0


def test_sdxl_config_conditions_every_example_on_the_released_fixed_size_ids():
    assert load("sdxl").data.sdxl_time_ids == "fixed"


def test_tiny_config_is_small_and_float32():
    config = load("tiny")
    assert config.data.resolution == 32 and config.train.global_batch_size == 8
    assert tuple(config.mesh.shape) == (-1, 1)
    assert config.model.compute_dtype == config.model.teacher_dtype == "float32"


def _uncommented(source: str) -> list[str]:
    """Targets of ``config.x = ...`` statements with no comment on their lines nor a comment line just above."""
    comments = [t for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.COMMENT]
    trailing = {t.start[0] for t in comments if t.line[: t.start[1]].strip()}
    whole_line = {t.start[0] for t in comments} - trailing
    return [
        target
        for target, first, last in _assignments(source)
        if not (trailing | whole_line) & set(range(first, last + 1)) and first - 1 not in whole_line
    ]


def _assignments(source: str) -> list[tuple[str, int, int]]:
    """(dotted target, first line, last line) of every ``config.x.y = ...`` statement."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Attribute):
            target = ast.unparse(node.targets[0])
            if target.startswith("config."):
                found.append((target.removeprefix("config."), node.lineno, node.end_lineno))
    return found


def test_every_value_of_the_base_recipe_has_a_comment():
    """Each ``config.x = ...`` of sd15.py has a comment on one of its lines or a comment line just above it."""
    source = (CONFIGS / "sd15.py").read_text()
    assert _uncommented(source) == []
    # ... and every value of the config is set by such a statement (none hidden in a dict literal).
    assert set(config_flat(load("sd15"))) <= {target for target, _, _ in _assignments(source)}


@pytest.mark.parametrize("name", VARIANTS)
def test_every_override_has_a_comment(name):
    assert _uncommented((CONFIGS / f"{name}.py").read_text()) == []


@pytest.mark.parametrize("name", VARIANTS)
def test_every_override_changes_a_value_of_the_base_recipe(name):
    """An override of a key sd15.py lacks (a typo) would add a key that nothing reads."""
    base, variant = config_flat(load("sd15")), config_flat(load(name))
    for target, _, _ in _assignments((CONFIGS / f"{name}.py").read_text()):
        assert target in base, f"configs/{name}.py sets {target}, which configs/sd15.py does not have"
        assert variant[target] != base[target], f"configs/{name}.py sets {target} to the base recipe's value"


def test_the_comment_rule_finds_a_value_without_one():
    source = "config.a.b = 1  # b\nconfig.a.c = 2\n# d\nconfig.a.d = 3\nconfig.a.e = (\n    1,  # e\n)\n"
    assert _uncommented(source) == ["a.c"]


# --- command-line overrides ------------------------------------------------------------------


def parse(*overrides: str) -> ml_collections.ConfigDict:
    """The config a CLI that defines ``--config`` with config_flags gets from these arguments."""
    argv = ["train", f"--config={CONFIGS / 'sd15.py'}", *overrides]
    flag_values = flags.FlagValues()
    holder = config_flags.DEFINE_config_file("config", flag_values=flag_values, sys_argv=argv)
    flag_values(argv)
    return holder.value


def test_command_line_overrides_reach_the_config():
    config = parse("--config.optim.lr=1e-4", "--config.mesh.shape=(2,4)", "--config.model.path=/models/sd15")
    assert config.optim.lr == 1e-4
    assert tuple(config.mesh.shape) == (2, 4)
    assert config.model.path == "/models/sd15"
    assert config.perflow.solver_steps == 8


def test_command_line_rejects_unknown_keys():
    with pytest.raises(AttributeError, match='Did you mean "lr" instead of "lrr"'):
        parse("--config.optim.lrr=1e-4")


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.train.num_stepz=3", "no key train.num_stepz; did you mean config.train.num_steps?"),
        ("--config.trian.num_steps=3", "no key trian.num_steps; did you mean config.train.num_steps?"),
        ("--config.optim.lrr=1e-4", "no key optim.lrr; did you mean config.optim.lr?"),
        (
            "--config.foo=1",
            "no key foo; config holds checkpoint, compilation_cache_dir, data, eval, log, mesh, model, optim, "
            "perflow, tpu_pod, train",
        ),
        ("--config.train.zzzzzz=1", "no key train.zzzzzz; config.train holds global_batch_size, "),
    ],
)
def test_an_unknown_override_is_named_with_the_closest_keys(override, message):
    argv = ["train", "--config", str(CONFIGS / "tiny.py"), "--config.model.path=/m", override]
    assert recipe.unknown_override(argv).startswith(
        f"{override.partition('=')[0]}: {CONFIGS / 'tiny.py'} has {message}"
    )


def test_known_overrides_and_a_config_that_does_not_load_give_no_message(tmp_path):
    assert recipe.unknown_override(["train", f"--config={CONFIGS / 'tiny.py'}", "--config.train.num_steps=3"]) is None
    (tmp_path / "broken.py").write_text("raise KeyError('mine')\n")
    assert recipe.unknown_override(["train", f"--config={tmp_path / 'broken.py'}", "--config.foo=1"]) is None


# --- validate: one test per message -----------------------------------------------------------


@pytest.mark.parametrize(
    "key, value, valid",
    [
        ("perflow.parameterization", "eps", "velocity, ddim_eps, diff_eps"),
        ("perflow.distance", "l1", "l2, huber"),
        ("perflow.weighting", "snr", "none, reciprocal, rcp_win"),
        ("perflow.teacher_prediction_type", "v", "epsilon, v_prediction"),
        ("model.attention_backend", "flash", "auto, xla, cudnn, splash"),
        ("model.remat", "yes", "none, full, dots"),
        ("model.compute_dtype", "fp16", "float32, bfloat16"),
        ("model.teacher_dtype", "half", "float32, bfloat16, float16"),
        ("optim.schedule", "linear", "constant, cosine"),
        ("data.sdxl_time_ids", "crop", "fixed, original"),
    ],
)
def test_unknown_names_are_refused_with_the_valid_ones(key, value, valid):
    message = problems(runnable(**{key: value}))
    assert f"config.{key} is {value!r}: choose one of {valid}" in message


def test_float16_training_is_refused_for_want_of_loss_scaling_but_a_float16_teacher_is_not():
    assert "compute_dtype is 'float16': training in float16 needs loss scaling" in problems(
        runnable(**{"model.compute_dtype": "float16"})
    )
    recipe.validate(runnable(**{"model.teacher_dtype": "float16"}))


@pytest.mark.parametrize("guidance", [0.5, float("nan"), float("inf")])
def test_guidance_below_one_or_not_finite_is_refused(guidance):
    assert f"config.perflow.teacher_guidance is {guidance}: use 1 for cfg_sync" in problems(
        runnable(**{"perflow.teacher_guidance": guidance})
    )


@pytest.mark.parametrize("guidance", [-1.0, float("nan")])
def test_sample_guidance_below_zero_or_nan_is_refused(guidance):
    assert f"config.log.sample_guidance is {guidance}: use 0 or more" in problems(
        runnable(**{"log.sample_guidance": guidance})
    )


@pytest.mark.parametrize("c", [0.0, -1e-3])
def test_non_positive_huber_constant_is_refused(c):
    assert f"config.perflow.huber_c is {c}: use a positive constant (the authors' default 0.001)" in problems(
        runnable(**{"perflow.huber_c": c})
    )


def test_zero_solver_steps_are_refused():
    assert "config.perflow.solver_steps is 0: the teacher needs at least 1 step" in problems(
        runnable(**{"perflow.solver_steps": 0})
    )


def test_zero_windows_are_refused():
    assert "config.perflow.num_windows is 0: use at least 1" in problems(runnable(**{"perflow.num_windows": 0}))


def test_more_solver_steps_than_teacher_timesteps_are_refused():
    message = problems(runnable(**{"perflow.num_windows": 8, "perflow.solver_steps": 200}))
    assert "num_windows x solver_steps is 1600, more than the teacher's 1000 timesteps" in message


@pytest.mark.parametrize("dropout", [-0.1, 1.0])
def test_text_dropout_outside_zero_one_is_refused(dropout):
    assert f"config.perflow.text_dropout is {dropout}: use a probability in [0, 1)" in problems(
        runnable(**{"perflow.text_dropout": dropout})
    )


@pytest.mark.parametrize("m", [2, 1001])
def test_discrete_timesteps_outside_windows_to_1000_are_refused(m):
    assert f"config.perflow.discrete_timesteps is {m}: use between num_windows (4) and 1000" in problems(
        runnable(**{"perflow.discrete_timesteps": m})
    )


@pytest.mark.parametrize("lr", [0.0, -1e-4])
def test_non_positive_learning_rate_is_refused(lr):
    assert f"config.optim.lr is {lr}: use a positive learning rate" in problems(runnable(**{"optim.lr": lr}))


def test_empty_global_batch_is_refused():
    assert "config.train.global_batch_size is 0: use at least 1" in problems(runnable(**{"train.global_batch_size": 0}))


def test_missing_paths_say_which_flag_to_set():
    message = problems(load("sd15"))
    assert "config.model.path is empty: set --config.model.path=DIR" in message
    assert "config.data.path is empty: set --config.data.path=DIR" in message


def test_fewer_sample_steps_than_windows_are_refused_with_the_reason():
    message = problems(runnable(**{"log.sample_steps": 1}))
    assert "config.log.sample_steps is 1 but there are 4 windows: every window needs a step" in message
    assert "--config.log.sample_steps=4" in message


def test_malformed_mesh_shapes_are_refused():
    assert "at most one size may be -1" in problems(runnable(**{"mesh.shape": (-1, -1)}))
    assert "sizes must be positive" in problems(runnable(**{"mesh.shape": (0, 8)}))


def test_cosine_warm_up_longer_than_the_run_is_refused():
    config = runnable(**{"optim.schedule": "cosine", "optim.warmup_steps": 6})
    assert "config.optim.warmup_steps (6) leaves no steps of the cosine decay" in problems(config)


def write_reference(path, *, feature="digits-mlp-64", image_size=32):
    """A statistics file of 80 random 64-d features, as python -m perflow_jax.evaluate writes them."""
    stats = fid.FeatureStats(64)
    stats.add(np.random.default_rng(0).normal(size=(80, 64)))
    fid.save_reference(path, stats, fid.FeatureSpec(feature, image_size, "center-crop"))
    return str(path)


def fid_on(tmp_path, **overrides) -> ml_collections.ConfigDict:
    """The tiny config with train-time FID of the digits features against a fitting reference; ``overrides``."""
    fitting = {"eval.fid_every": 3, "eval.features": "digits", "eval.reference": write_reference(tmp_path / "ref.npz")}
    return runnable(**{**fitting, **overrides})


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_train_time_fid_is_off_in_every_config(name):
    assert load(name).eval.fid_every == 0


def test_train_time_fid_against_a_reference_made_for_the_run_passes(tmp_path):
    recipe.validate(fid_on(tmp_path))


def test_train_time_fid_without_a_reference_file_is_refused_saying_how_to_make_one(tmp_path):
    message = problems(fid_on(tmp_path, **{"eval.reference": str(tmp_path / "none.npz")}))
    assert f"config.eval.reference '{tmp_path / 'none.npz'}' is not a file: make it with python -m " in message
    assert "perflow_jax.evaluate --features digits --height 32" in message


def test_a_reference_of_another_image_size_or_feature_network_is_refused_naming_both(tmp_path):
    other = write_reference(tmp_path / "64px.npz", image_size=64)
    message = problems(fid_on(tmp_path, **{"eval.reference": other}))
    assert f"config.eval.reference: reference statistics {other} were made with image_size 64" in message
    assert "this evaluation uses image_size 32" in message and "--height 32" in message
    inception = write_reference(tmp_path / "inception.npz", feature="inception-v3-pool3")
    message = problems(fid_on(tmp_path, **{"eval.reference": inception}))
    assert "feature 'inception-v3-pool3' but this evaluation uses feature 'digits-mlp-64'" in message


def test_train_time_inception_fid_without_the_weights_file_says_where_to_get_it(tmp_path):
    reference = write_reference(tmp_path / "inception.npz", feature="inception-v3-pool3")
    config = fid_on(tmp_path, **{"eval.features": "inception", "eval.reference": reference})
    config.eval.inception = str(tmp_path / "pt_inception.pth")
    message = problems(config)
    assert f"config.eval.inception '{tmp_path / 'pt_inception.pth'}' is not a file: download https://" in message
    assert "config.eval.reference" not in message  # an Inception reference of 32 px images fits


def test_train_time_fid_settings_out_of_range_are_refused(tmp_path):
    assert "config.eval.fid_every is -1: use 0 (off)" in problems(runnable(**{"eval.fid_every": -1}))
    config = fid_on(tmp_path, **{"eval.num_images": 1, "eval.batch_size": 0, "eval.steps": 2})
    config.eval.prompts, config.eval.features = str(tmp_path / "prompts.txt"), "clip"
    with pytest.raises(recipe.ConfigError) as info:
        recipe.validate(config)
    assert [p.split(" is ")[0].split(":")[0] for p in info.value.problems] == [
        "config.eval.num_images",
        "config.eval.batch_size",
        "config.eval.steps",
        f"config.eval.prompts {tmp_path / 'prompts.txt'}",
        "config.eval.features",
    ]


def test_every_problem_is_listed_at_once():
    config = runnable(**{"perflow.solver_steps": 0, "optim.lr": 0.0, "perflow.distance": "l1"})
    with pytest.raises(recipe.ConfigError) as info:
        recipe.validate(config)
    assert len(info.value.problems) == 3


# --- validate_against ------------------------------------------------------------------------


def test_matching_model_data_and_devices_pass():
    against(runnable())
    against(runnable(), cross_attention_dim=2048, text_widths=[768, 1280], sdxl=True, manifest=XL_MANIFEST)


def test_one_text_encoder_for_an_sdxl_unet_points_to_the_sdxl_config():
    message = against_problems(runnable(), cross_attention_dim=2048, text_widths=[768])
    assert "UNet config has cross_attention_dim 2048 but the text encoder gives 768-wide states" in message
    assert "is this an SDXL checkpoint?" in message and "configs/sdxl.py" in message


def test_sd2_unet_with_a_768_wide_text_encoder_points_to_the_sd21_config():
    message = against_problems(runnable(), cross_attention_dim=1024, text_widths=[768])
    assert "cross_attention_dim 1024 but the text encoder gives 768-wide states" in message
    assert "configs/sd21.py" in message


def test_sdxl_unet_with_data_of_one_tokenizer_is_refused():
    message = against_problems(runnable(), cross_attention_dim=2048, text_widths=[768, 1280], sdxl=True)
    assert "the UNet is SDXL's (two text encoders) but the data at /data/prepared" in message
    assert "no input_ids_2" in message


def test_sdxl_data_for_a_non_sdxl_unet_is_refused():
    message = against_problems(runnable(), manifest=XL_MANIFEST)
    assert "was prepared for SDXL (it has input_ids_2) but the UNet is not SDXL's" in message


def test_resolution_differing_from_the_prepared_data_is_refused():
    message = against_problems(runnable(), manifest={**SD_MANIFEST, "resolution": 64})
    assert "config.data.resolution is 32 but the data at /data/prepared was prepared at 64 px" in message
    assert "--config.data.resolution=64" in message


def test_teacher_prediction_type_differing_from_the_scheduler_is_refused():
    message = against_problems(runnable(), teacher_prediction_type="v_prediction")
    assert "--config.perflow.teacher_prediction_type=v_prediction" in message


def test_global_batch_not_divisible_by_devices_suggests_the_nearest_sizes():
    message = against_problems(runnable(**{"train.global_batch_size": 1000}), device_count=48)
    assert "global_batch_size 1000 does not split evenly over 48 devices" in message
    assert "e.g. 960 or 1008" in message


def test_zero_accumulation_steps_are_refused():
    message = problems(runnable(**{"train.gradient_accumulation_steps": 0}))
    assert "config.train.gradient_accumulation_steps is 0: use at least 1" in message


def test_microbatches_must_split_each_devices_examples_evenly():
    config = runnable(**{"train.global_batch_size": 96, "train.gradient_accumulation_steps": 5})
    message = against_problems(config, device_count=8)
    assert "gradient_accumulation_steps 5 does not split the 12 examples per device" in message
    assert "use a divisor of 12, e.g. 6, or a global batch that is a multiple of the devices x 5" in message
    against(runnable(**{"train.global_batch_size": 96, "train.gradient_accumulation_steps": 4}), device_count=8)


def test_mesh_shape_not_multiplying_to_the_device_count_is_refused():
    message = against_problems(runnable(**{"mesh.shape": (2, 2)}))
    assert "config.mesh.shape (2, 2) holds 4 devices but there are 8" in message


def test_mesh_size_not_dividing_the_device_count_is_refused():
    message = against_problems(runnable(**{"mesh.shape": (-1, 3)}))
    assert "split into groups of 3: use a size that divides 8 (1, 2, 4, 8)" in message


# --- settings and optimizer ------------------------------------------------------------------


def test_settings_carry_the_perflow_group():
    settings = recipe.settings(load("sdxl"))
    assert settings == step.PeRFlowSettings(
        parameterization="ddim_eps", num_windows=4, solver_steps=10, teacher_guidance=7.5,
        discrete_timesteps=200,
    )  # fmt: skip
    assert recipe.settings(runnable(**{"perflow.huber_c": 0.05})).huber_c == 0.05


def test_constant_schedule_with_warm_up_rises_linearly_then_holds():
    config = runnable(**{"optim.lr": 1e-4, "optim.warmup_steps": 10, "train.num_steps": 100})
    lr = recipe.learning_rate(config)
    np.testing.assert_allclose([lr(0), lr(5), lr(10), lr(99)], [0.0, 5e-5, 1e-4, 1e-4], rtol=1e-6)


def test_cosine_schedule_with_warm_up_decays_to_zero_at_the_end():
    config = runnable(**{"optim.lr": 1e-4, "optim.warmup_steps": 10, "optim.schedule": "cosine",
                         "train.num_steps": 110})  # fmt: skip
    lr = recipe.learning_rate(config)
    np.testing.assert_allclose([lr(0), lr(10), lr(60), lr(110)], [0.0, 1e-4, 5e-5, 0.0], rtol=1e-6, atol=1e-12)


def test_constant_schedule_without_warm_up_is_the_learning_rate_from_step_0():
    lr = recipe.learning_rate(load("sd15"))
    np.testing.assert_allclose([lr(0), lr(5000)], [8e-5, 8e-5], rtol=1e-6)


def test_optimizer_clips_then_applies_adamw_at_the_scheduled_rate():
    config = runnable(**{"optim.lr": 1e-3, "optim.warmup_steps": 2, "optim.weight_decay": 0.0})
    optimizer = recipe.optimizer(config)
    params = {"w": np.zeros(3, np.float32)}
    state = optimizer.init(params)
    grads = {"w": np.array([30.0, 40.0, 0.0], np.float32)}  # norm 50: clipped to 1
    sizes = []
    for _ in range(3):
        updates, state = optimizer.update(grads, state, params)
        sizes.append(float(np.abs(updates["w"][0])))
    # Adam's first steps move each coordinate by ~lr (m / sqrt(v) = 1): lr 0, 5e-4, 1e-3 with warm-up 2.
    np.testing.assert_allclose(sizes, [0.0, 5e-4, 1e-3], rtol=1e-4)
