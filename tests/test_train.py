"""python -m perflow_jax.train on a tiny converted model and prepared data, on the CPU."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from array_record.python.array_record_module import ArrayRecordReader
from jax.experimental import multihost_utils

from perflow_jax import checkpoint, data, fid, image_io, recipe, sample, training
from perflow_jax.demo import classifier, digits
from tests.helpers.pipelines import quiet, tiny_model_and_data
from tests.helpers.processes import library_logs, run_joined_processes
from tests.helpers.recipes import load

ROOT = Path(__file__).resolve().parents[1]
FROM_CACHE = "(loaded from the compilation cache)"  # the end of train's "compiled the training step in X s" line


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(converted tiny model, prepared data of 24 captioned 32 px images)."""
    _, model, data_dir = tiny_model_and_data(tmp_path_factory.mktemp("train"), count=24, size=(40, 48), captions=5)
    return model, data_dir


@pytest.fixture(scope="module")
def heldout_reference(tmp_path_factory):
    """(path, statistics) of the held-out digits' classifier features, as evaluate writes a 32 px reference."""
    real = fid.FeatureStats(64)
    real.add(classifier.features(digits.load("heldout")[0]))
    path = tmp_path_factory.mktemp("reference") / "heldout.npz"
    return path, fid.save_reference(path, real, fid.FeatureSpec("digits-mlp-64", 32, "center-crop"))


def fid_overrides(reference, every: int) -> list[str]:
    """Train-time FID of 6 images (batches of 4) every ``every`` steps and at the last, with the digits classifier."""
    keys = (f"fid_every={every}", "features=digits", "num_images=6", "batch_size=4", f"reference={reference}")
    return [f"--config.eval.{key}" for key in keys]


def command(setup, workdir, *overrides):
    model, data_dir = setup
    return [
        sys.executable, "-m", "perflow_jax.train", "--config", str(ROOT / "configs/tiny.py"), "--workdir", str(workdir),
        f"--config.model.path={model}", f"--config.data.path={data_dir}", "--config.data.worker_count=0", *overrides,
    ]  # fmt: skip


def run(setup, workdir, *overrides, env=None):
    result = subprocess.run(command(setup, workdir, *overrides), capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, **(env or {})}, timeout=600)  # fmt: skip
    return result


def saved_state(workdir: Path, step: int) -> dict:
    manager = ocp.CheckpointManager(workdir.absolute() / "checkpoints")
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    manager.close()
    return restored["state"]


def rows(workdir: Path, key: str) -> dict[int, float]:
    """{step: value} of the metrics.jsonl rows that hold ``key``."""
    logged = map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
    return {row["step"]: row[key] for row in logged if key in row}


def losses(workdir: Path) -> dict[int, float]:
    return rows(workdir, "loss")


def test_cli_trains_and_writes_metrics_tensorboard_checkpoints_samples_and_fid(setup, heldout_reference, tmp_path):
    model, data_dir = setup
    relative = [
        f"--config.model.path={os.path.relpath(model, ROOT)}",
        f"--config.data.path={os.path.relpath(data_dir, ROOT)}",
    ]
    path, reference = heldout_reference
    result = run(setup, tmp_path / "run", "--config.train.num_steps=4", *relative, *fid_overrides(path, 3))
    assert result.returncode == 0, result.stderr[-3000:]
    # The saved config names the folders absolutely: export and sample find them from anywhere.
    saved = checkpoint.run_config(tmp_path / "run")[1]
    assert (saved["model"]["path"], saved["data"]["path"]) == (str(model), str(data_dir))
    logged = losses(tmp_path / "run")
    assert sorted(logged) == [1, 2, 3, 4] and all(np.isfinite(v) for v in logged.values())
    assert "step 4/4 | loss" in result.stdout and "per window" in result.stdout
    assert library_logs(result.stderr) == []  # Orbax's and JAX's INFO lines: only with --verbose
    assert list((tmp_path / "run/tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "run/checkpoints/4").is_dir()
    assert not (tmp_path / "run/lock").exists()  # released at the end
    samples = sorted(p.name for p in (tmp_path / "run/samples").glob("*.png"))
    assert "teacher_ddim.png" in samples and "step_000004.png" in samples
    # The FID is that of the last checkpoint's EMA images (image j: the grid's prompt j mod 2, the seed's noise j).
    scores = rows(tmp_path / "run", "eval/fid")
    assert sorted(scores) == [3, 4] and scores[3] != scores[4]
    config = load("tiny")
    prompts = [config.log.sample_prompts[j % 2] for j in range(6)]
    log = config.log
    grid = tmp_path / "grid.png"
    options = sample.Options(
        tmp_path / "run", prompts, grid, log.sample_steps, log.sample_guidance, seed=log.sample_seed
    )
    drawn = fid.FeatureStats(64)
    drawn.add(classifier.features(image_io.to_uint8(sample.sample(options, log=quiet).images)))
    expected = fid.frechet_distance(drawn.mean, drawn.sigma, reference.mu, reference.sigma)
    assert scores[4] == pytest.approx(expected, rel=1e-6)  # float64 statistics of the same uint8 images
    assert f"step 4/4 | FID {expected:.3f} vs {path} (6 images, 4 steps)" in result.stdout


def test_sigterm_then_resume_equals_one_uninterrupted_run(setup, heldout_reference, tmp_path):
    straight = run(setup, tmp_path / "straight", "--config.train.num_steps=6")
    assert straight.returncode == 0, straight.stderr[-3000:]
    # The compiled step goes to JAX's persistent cache in WORKDIR/jax_cache; each resume below loads it from there.
    assert "compiled the training step in" in straight.stdout and FROM_CACHE not in straight.stdout
    assert list((tmp_path / "straight/jax_cache").iterdir())

    # No periodic checkpoint before the end: the one to resume from is SIGTERM's. The resumed run also
    # measures FID, which must change nothing of the training. Its runs share the first run's cache
    # (--config.compilation_cache_dir), so that none compiles the step again.
    measure = (*fid_overrides(heldout_reference[0], 2), f"--config.compilation_cache_dir={tmp_path}/straight/jax_cache")
    settings = ("--config.train.num_steps=6", "--config.checkpoint.every_steps=100", *measure)
    process = subprocess.Popen(command(setup, tmp_path / "resumed", *settings),
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    head = []  # the lines before SIGTERM
    for line in process.stdout:
        head.append(line)
        if line.startswith("step 3/6"):
            process.send_signal(signal.SIGTERM)
            break
    out, err = process.communicate(timeout=600)
    assert process.returncode == 143, err[-3000:]  # stopped before the last step: resume me
    assert "SIGTERM: stopping after this step with a checkpoint" in err
    assert not (tmp_path / "resumed/lock").exists()
    stopped_at = max(int(p.name) for p in (tmp_path / "resumed/checkpoints").iterdir() if p.name.isdigit())
    assert 3 <= stopped_at < 6
    assert f"stopped at step {stopped_at} on request" in out
    assert FROM_CACHE in "".join(head)

    resumed = run(setup, tmp_path / "resumed", "--config.train.num_steps=6", *measure)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert sorted(rows(tmp_path / "resumed", "eval/fid")) == [2, 4, 6]  # each step's FID logged once
    assert f"resuming from the checkpoint of step {stopped_at}" in resumed.stdout
    assert FROM_CACHE in resumed.stdout
    a, b = saved_state(tmp_path / "straight", 6), saved_state(tmp_path / "resumed", 6)
    for key in ("params", "ema_params", "opt_state"):
        for x, y in zip(jax_leaves(a[key]), jax_leaves(b[key]), strict=True):
            np.testing.assert_array_equal(x, y)
    # Same data order and noise: every step's loss is the same.
    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")

    # An unreadable newest checkpoint: the run resumes from the one before (step 3) and saves step 6 again.
    for path in (tmp_path / "straight/checkpoints/6").rglob("*"):
        if path.is_file():
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    again = run(setup, tmp_path / "straight", "--config.train.num_steps=6")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"the checkpoint {tmp_path / 'straight/checkpoints/6'} cannot be read" in again.stderr
    assert "resuming from the checkpoint of step 3" in again.stdout
    assert FROM_CACHE in again.stdout
    assert [p.name[:2] for p in (tmp_path / "straight/broken_checkpoints").iterdir()] == ["6-"]
    a = saved_state(tmp_path / "straight", 6)
    for key in ("params", "ema_params", "opt_state"):
        for x, y in zip(jax_leaves(a[key]), jax_leaves(b[key]), strict=True):
            np.testing.assert_array_equal(x, y)


def jax_leaves(tree):
    import jax

    return jax.tree.leaves(tree)


def test_an_unknown_config_key_ends_the_command_in_one_line_with_the_closest_key(tmp_path):
    command = [sys.executable, "-m", "perflow_jax.train", "--config", "configs/tiny.py"]
    command += ["--workdir", str(tmp_path / "w"), "--config.train.num_stepz=3"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 2
    assert result.stderr == (
        "error: --config.train.num_stepz: configs/tiny.py has no key train.num_stepz; "
        "did you mean config.train.num_steps?\n"
    )
    assert not (tmp_path / "w").exists()


def test_resume_with_other_settings_is_refused_naming_them(setup, tmp_path):
    assert run(setup, tmp_path / "run", "--config.train.num_steps=1").returncode == 0
    # Length, logging and how the step is computed may change: here the gradient in 2 microbatches.
    longer = run(setup, tmp_path / "run", "--config.train.num_steps=2", "--config.log.every_steps=2",
                 "--config.train.gradient_accumulation_steps=2")  # fmt: skip
    assert longer.returncode == 0, longer.stderr[-3000:]
    assert "step 2/2 | loss" in longer.stdout
    other = run(setup, tmp_path / "run", "--config.train.num_steps=3", "--config.optim.lr=0.5")
    assert other.returncode == 2
    assert "other settings (optim.lr: 0.0001 saved, 0.5 now)" in other.stderr


def test_data_prepared_with_another_vae_is_refused_at_start(setup, tmp_path):
    model, data_dir = setup
    other = shutil.copytree(data_dir, tmp_path / "data")
    manifest = data.read_manifest(other)
    data.write_manifest(other, {**manifest, "model_fingerprint": "0123456789abcdef"})
    config = load("tiny")
    config.model.path, config.data.path = str(model), str(other)
    expected = rf"fingerprint 0123456789abcdef\) than the model's \({manifest['model_fingerprint']}\)"
    with pytest.raises(ValueError, match=expected):
        training.train_and_evaluate(config, tmp_path / "run")


def test_a_workdir_saved_before_allow_other_vae_existed_resumes_with_it_set():
    recipe.check_resumable({"data": {"seed": 0}}, {"data": {"seed": 0, "allow_other_vae": True}})


def test_a_workdir_saved_before_train_time_fid_existed_resumes_with_it_on():
    recipe.check_resumable({"data": {"seed": 0}}, {"data": {"seed": 0}, "eval": {"fid_every": 100}})


def test_a_nan_in_the_data_stops_the_run_and_keeps_the_last_checkpoint(setup, tmp_path):
    model, data_dir = setup
    data_copy = tmp_path / "data"
    shutil.copytree(data_dir, data_copy)
    overrides = (f"--config.data.path={data_copy}",)
    assert run(setup, tmp_path / "run", "--config.train.num_steps=3", *overrides).returncode == 0
    before = (tmp_path / "run/checkpoints/3").stat().st_mtime_ns
    for shard in data.shard_paths(data_copy):  # every latent moment becomes NaN from here on
        reader = ArrayRecordReader(str(shard))
        examples = [data.decode_record(r) for r in reader.read_all()]
        reader.close()
        for example in examples:
            example["mean"] = np.full_like(example["mean"], np.nan)
        data.write_shard(shard, [data.encode_record(e) for e in examples])
    result = run(setup, tmp_path / "run", "--config.train.num_steps=6", *overrides)
    assert result.returncode == 2
    assert "the loss became nan at step 4" in result.stderr
    assert sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir() if p.name.isdigit()) == ["3"]
    assert (tmp_path / "run/checkpoints/3").stat().st_mtime_ns == before


def test_two_processes_stop_together_on_one_sigterm_save_and_resume(setup, tmp_path):
    def pair(steps, **kwargs):  # the state sharded over both processes' devices: mesh (1, 2)
        run = command(setup, tmp_path / "run", f"--config.train.num_steps={steps}", "--config.mesh.shape=(1,-1)",
                      "--config.checkpoint.every_steps=100")  # fmt: skip
        return run_joined_processes(run, 2, timeout=600, **kwargs)

    # A preemption notice reaches one worker only (here process 1, which prints nothing): both stop.
    out = pair(8, signal_at=("step 2/8", 1), returncode=143)[0]
    saved = [int(p.name) for p in (tmp_path / "run/checkpoints").iterdir() if p.name.isdigit()]
    assert len(saved) == 1 and 2 <= saved[0] < 8, saved
    assert f"stopped at step {saved[0]} on request" in out
    out = pair(8)[0]
    assert f"resuming from the checkpoint of step {saved[0]}" in out
    rows = [json.loads(line)["step"] for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert rows == list(range(1, 9))


def test_a_step_with_an_infinite_gradient_norm_is_not_checkpointed():
    good, bad = {"loss": np.float32(0.5), "grad_norm": np.float32(2.0)}, {"loss": np.float32(0.5), "grad_norm": np.inf}
    training._check_finite([(4, good)])
    with pytest.raises(training.TrainingError, match="the grad norm became inf at step 5"):
        training._check_finite([(4, good), (5, bad)])


def test_ctrl_c_asks_to_stop_twice_aborts_and_the_handlers_come_back():
    before = signal.getsignal(signal.SIGINT)
    with training.Stop() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested and stop.agreed(3)
        assert training.Stopped(3, stop.signum).exit_code == 130
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def test_a_joined_run_asks_jax_preemption_service_at_every_step_and_runs_nothing_on_the_devices(monkeypatch):
    asked, launched = [], []

    def reached_preemption_sync_point(step):  # the service fixed step 7 after a notice
        asked.append(step)
        return step == 7

    def recording(name, function):
        def wrapper(*args, **kwargs):
            launched.append(name)
            return function(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", reached_preemption_sync_point)
    for name in ("jit", "device_put", "make_array_from_process_local_data"):
        monkeypatch.setattr(jax, name, recording(name, getattr(jax, name)))
    with training.Stop(first_step=5) as stop:
        stopping = [stop.agreed(step) for step in (6, 7)]
    assert asked == [5, 6, 7]  # the resumed-from step first, so that a notice during the first compile counts
    assert stopping == [False, True]
    assert launched == []  # no collective, no device sync: the step's program is all that runs


# Two processes of a joined run stepping like the training loop; process 0 holds WORKDIR's lock, as in train.
JOINED_STOP = """
import contextlib, sys, time
import jax
from perflow_jax import checkpoint, sharding, training
sharding.initialize_distributed()
lock = checkpoint.WorkdirLock(sys.argv[1]) if jax.process_index() == 0 else contextlib.nullcontext()
with lock, training.Stop(first_step=5) as stop:
    for step in range(6, 600):
        print(f"step {step}", flush=True)
        time.sleep(0.05)
        if stop.agreed(step):
            break
print(f"stopped after step {step}")
sys.exit(training.Stopped(step, stop.signum).exit_code)
"""


def test_ctrl_c_to_one_process_of_a_joined_run_stops_both_after_the_same_step(tmp_path):
    # Ctrl-C reaches process 0, which holds the lock: passed on as a preemption notice, which the lock
    # leaves to JAX's preemption service. That process exits 130, the other 143 ("stopped, resume me").
    command = [sys.executable, "-c", JOINED_STOP, str(tmp_path)]
    stop = {"signal_at": ("step 8", 0), "signum": signal.SIGINT, "returncode": [130, 143]}
    outs = run_joined_processes(command, 2, timeout=600, **stop)
    last = [out.splitlines()[-1] for out in outs]
    assert last[0] == last[1] and last[0].startswith("stopped after step ")
    assert int(last[0].split()[-1]) > 8
    assert not (tmp_path / "lock").exists()


def test_a_student_init_of_another_architecture_is_refused_naming_a_parameter():
    teacher = {"conv_in": {"kernel": np.zeros((3, 3, 4, 32))}, "time": {"bias": np.zeros(32)}}
    same = {"conv_in": {"kernel": np.ones((3, 3, 4, 32))}, "time": {"bias": np.ones(32)}}
    training.check_same_architecture(teacher, same, "same")
    other = {"conv_in": {"kernel": np.zeros((3, 3, 4, 64))}, "time": {"bias": np.zeros(32)}}
    with pytest.raises(
        training.TrainingError, match=r"student_init other.*1 parameters differ.*\(3, 3, 4, 32\) in the teacher"
    ):
        training.check_same_architecture(teacher, other, "other")


def test_a_workdir_saved_with_relative_folders_resumes_from_the_same_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    saved = {"model": {"path": "models/sd15", "student_init": ""}, "data": {"path": "data"}}
    now = {
        "model": {"path": str(tmp_path / "models/sd15"), "student_init": ""},
        "data": {"path": str(tmp_path / "data")},
    }
    recipe.check_resumable(saved, now)
    moved = {**now, "data": {"path": str(tmp_path / "other")}}
    with pytest.raises(recipe.ResumeError, match=f"data.path: '{tmp_path / 'data'}' saved"):
        recipe.check_resumable(saved, moved)


def test_a_workdir_saved_before_a_key_existed_resumes_only_with_the_behaviour_it_trained_with():
    saved = {"perflow": {"distance": "huber"}, "data": {"resolution": 1024}}
    now = {
        "perflow": {"distance": "huber", "huber_c": 1e-3},
        "data": {"resolution": 1024, "sdxl_time_ids": "original"},
    }
    recipe.check_resumable(saved, now)
    fixed = {**now, "data": {"resolution": 1024, "sdxl_time_ids": "fixed"}}
    with pytest.raises(recipe.ResumeError, match="data.sdxl_time_ids: 'original' saved, 'fixed' now"):
        recipe.check_resumable(saved, fixed)


def test_a_workdir_saved_before_gradient_accumulation_existed_resumes():
    now = {"train": {"num_steps": 8, "gradient_accumulation_steps": 2}, "model": {"remat": "full"}}
    recipe.check_resumable({"train": {"num_steps": 4}, "model": {"remat": "none"}}, now)


def test_a_workdir_that_is_a_file_is_refused_before_any_work(setup, tmp_path):
    model, data_dir = setup
    config = recipe.config_module(ROOT / "configs/tiny.py").get_config()
    config.model.path, config.data.path = str(model), str(data_dir)
    (tmp_path / "notes.txt").write_text("not a run")
    with pytest.raises(training.TrainingError, match=f"--workdir {tmp_path / 'notes.txt'} is a file, not a folder"):
        training.train_and_evaluate(config, tmp_path / "notes.txt")
    assert (tmp_path / "notes.txt").read_text() == "not a run"
