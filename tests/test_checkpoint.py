"""Training checkpoints: state, data position and config saved together, restored exactly."""

import errno
import json
import os
import signal
import socket
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from orbax.checkpoint._src.handlers import json_checkpoint_handler

from perflow_jax import checkpoint, data
from perflow_jax.step import TrainState


@pytest.fixture
def prepared(tmp_path):
    """A prepared data folder of 40 examples whose mean holds the example's index."""
    folder = tmp_path / "data"
    folder.mkdir()
    records = [
        data.encode_record({"key": str(i), "caption": "c", "mean": np.full((2, 2, 4), i, np.float16),
                            "logvar": np.zeros((2, 2, 4), np.float16), "input_ids": np.full(77, i, np.int32),
                            "original_size": np.array([8, 8], np.int32), "crop_top_left": np.zeros(2, np.int32)})
        for i in range(40)
    ]  # fmt: skip
    data.write_shard(folder / "shard-00000.array_record", records)
    data.write_manifest(
        folder, {"count": 40, "resolution": 8, "shards": [{"file": "shard-00000.array_record", "count": 40}]}
    )
    return folder


def state(value: float) -> TrainState:
    params = {"w": jnp.full((3, 4), value), "b": jnp.arange(4.0) + value}
    return TrainState(step=jnp.array(int(value), jnp.int32), params=params, opt_state=(params,), ema_params=params)


def ids(batch) -> list[int]:
    return [int(x) for x in batch["mean"][:, 0, 0, 0]]


def test_restore_gives_the_state_the_config_and_the_data_position(tmp_path, prepared):
    iterator = data.create_iterator(prepared, batch_size=4, seed=0, process_index=0, process_count=1)
    for _ in range(3):
        next(iterator)
    ckpt = checkpoint.Checkpoints(tmp_path / "run", keep=2)
    ckpt.save(3, state(3.0), iterator, {"optim": {"lr": 1e-4}})
    expected_next = [ids(next(iterator)) for _ in range(12)]  # crosses the epoch boundary (10 batches)
    ckpt.close()

    fresh = data.create_iterator(prepared, batch_size=4, seed=0, process_index=0, process_count=1)
    reopened = checkpoint.Checkpoints(tmp_path / "run", keep=2)
    assert reopened.latest_step() == 3
    restored, config = reopened.restore(3, checkpoint.abstract_like(state(0.0)), fresh)
    assert config == {"optim": {"lr": 1e-4}} and reopened.saved_config(3) == config
    assert int(restored.step) == 3
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state(3.0)), strict=True):
        np.testing.assert_array_equal(a, b)
    assert [ids(next(fresh)) for _ in range(12)] == expected_next


def test_only_the_newest_checkpoints_are_kept(tmp_path, prepared):
    iterator = data.create_iterator(prepared, batch_size=4, seed=0, process_index=0, process_count=1)
    ckpt = checkpoint.Checkpoints(tmp_path / "run", keep=2)
    for step in (1, 2, 3):
        ckpt.save(step, state(float(step)), iterator, {})
        ckpt.wait()
    assert ckpt.all_steps() == [2, 3]
    ckpt.close()


def test_an_uncommitted_save_is_not_a_checkpoint(tmp_path, prepared):
    """A save that never finished (a leftover temporary folder) is ignored; the last one is restored."""
    iterator = data.create_iterator(prepared, batch_size=4, seed=0, process_index=0, process_count=1)
    ckpt = checkpoint.Checkpoints(tmp_path / "run")
    ckpt.save(1, state(1.0), iterator, {})
    ckpt.close()
    (tmp_path / "run/checkpoints/2.orbax-checkpoint-tmp").mkdir()  # what an interrupted save leaves
    reopened = checkpoint.Checkpoints(tmp_path / "run")
    assert reopened.latest_step() == 1


def truncate_files(folder):
    """Cut every file under ``folder`` to half its length (what a full disk or a bad copy leaves)."""
    for path in folder.rglob("*"):
        if path.is_file():
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_an_unreadable_newest_checkpoint_is_named_and_the_one_before_is_used(tmp_path, prepared, capsys):
    iterator = data.create_iterator(prepared, batch_size=4, seed=0, process_index=0, process_count=1)
    ckpt = checkpoint.Checkpoints(tmp_path / "run", keep=3)
    for step in (1, 2, 3):
        ckpt.save(step, state(float(step)), iterator, {"saved_at": step})
        ckpt.wait()
    ckpt.close()
    truncate_files(tmp_path / "run/checkpoints/3/state")
    broken = f"the checkpoint {tmp_path.absolute() / 'run/checkpoints/3'} cannot be read"

    # sample and export: the newest readable one, and the broken one left where it is
    assert checkpoint.run_config(tmp_path / "run") == (2, {"saved_at": 2})
    step, params, _ = checkpoint.trained_unet(tmp_path / "run")
    assert step == 2 and np.array_equal(params["w"], np.full((3, 4), 2.0))
    assert broken in capsys.readouterr().err
    with pytest.raises(checkpoint.CheckpointError, match=f"{broken} .*give another step"):
        checkpoint.trained_unet(tmp_path / "run", step=3)
    assert (tmp_path / "run/checkpoints/3").is_dir()

    # training: resumes from step 2, moves step 3 aside, and can save step 3 again
    resumed = checkpoint.Checkpoints(tmp_path / "run", keep=3)
    fresh = data.create_iterator(prepared, batch_size=4, seed=0, process_index=0, process_count=1)
    step, restored = resumed.restore_newest(checkpoint.abstract_like(state(0.0)), fresh)
    assert step == 2 and int(restored.step) == 2
    assert broken in capsys.readouterr().err
    (aside,) = (tmp_path / "run/broken_checkpoints").iterdir()
    assert aside.name.startswith("3-") and (aside / "state").is_dir()
    resumed.save(3, state(3.5), fresh, {"saved_at": 3})
    resumed.close()
    assert checkpoint.run_config(tmp_path / "run") == (3, {"saved_at": 3})


def test_when_no_checkpoint_is_readable_the_error_is_one_line(tmp_path, prepared):
    iterator = data.create_iterator(prepared, batch_size=4, seed=0, process_index=0, process_count=1)
    ckpt = checkpoint.Checkpoints(tmp_path / "run")
    ckpt.save(1, state(1.0), iterator, {})
    ckpt.close()
    truncate_files(tmp_path / "run/checkpoints/1")
    with pytest.raises(checkpoint.CheckpointError, match=r"none of the checkpoints in .* \(steps 1\) can be read"):
        checkpoint.trained_unet(tmp_path / "run")


def test_a_failed_save_is_one_error_and_its_temporary_folder_goes_at_the_next_start(tmp_path, prepared, monkeypatch):
    iterator = data.create_iterator(prepared, batch_size=4, seed=0, process_index=0, process_count=1)
    ckpt = checkpoint.Checkpoints(tmp_path / "run")
    ckpt.save(1, state(1.0), iterator, {})
    ckpt.wait()

    async def disk_full(self, x, directory):
        raise OSError(errno.ENOSPC, "No space left on device", str(directory))

    monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", disk_full)
    ckpt.save(2, state(2.0), iterator, {})
    while ckpt.manager.is_saving_in_progress():  # the write ends in the background
        time.sleep(0.05)
    with pytest.raises(checkpoint.CheckpointError) as failure:
        ckpt.check()
    assert str(failure.value).startswith(
        f"saving the checkpoint of step 2 in {tmp_path.absolute() / 'run/checkpoints'} failed (OSError: [Errno 28] "
        "No space left on device"
    )
    assert "its newest checkpoint is step 1: free some space, then run the same command again" in str(failure.value)
    assert (tmp_path / "run/checkpoints/2.orbax-checkpoint-tmp").is_dir()
    monkeypatch.undo()

    reopened = checkpoint.Checkpoints(tmp_path / "run")
    assert reopened.all_steps() == [1]
    # Orbax removes it in a background thread started at the next start, which its next save waits for
    reopened.save(3, state(3.0), iterator, {})
    reopened.wait()
    assert sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir()) == ["1", "3"]
    reopened.close()


def test_a_second_run_on_a_workdir_is_refused_naming_the_first(tmp_path):
    with checkpoint.WorkdirLock(tmp_path) as first:
        holder = json.loads((tmp_path / "lock").read_text())
        assert holder == first.holder and holder["pid"] == os.getpid()
        with pytest.raises(checkpoint.CheckpointError) as refused:
            checkpoint.WorkdirLock(tmp_path).__enter__()
        assert str(refused.value).startswith(
            f"{tmp_path.absolute()} is in use by process {os.getpid()} on {socket.gethostname()}, started "
            f"{holder['start']}: wait for it to end"
        )
    assert not (tmp_path / "lock").exists()
    with checkpoint.WorkdirLock(tmp_path):
        assert (tmp_path / "lock").exists()


def test_a_lock_of_a_process_that_ended_is_taken_over_with_a_warning(tmp_path, capsys):
    ended = subprocess.Popen(["true"])
    ended.wait()
    host = socket.gethostname()
    (tmp_path / "lock").write_text(json.dumps({"host": host, "pid": ended.pid, "start": "2026-01-01T00:00:00Z"}))
    with checkpoint.WorkdirLock(tmp_path):
        assert json.loads((tmp_path / "lock").read_text())["pid"] == os.getpid()
    assert (
        f"taking over {tmp_path.absolute() / 'lock'} from process {ended.pid} on {host}, started "
        "2026-01-01T00:00:00Z, which runs no more" in capsys.readouterr().err
    )


def test_a_lock_from_another_host_is_refused_saying_how_to_remove_it(tmp_path):
    (tmp_path / "lock").write_text(json.dumps({"host": "elsewhere", "pid": 1, "start": "2026-01-01T00:00:00Z"}))
    with pytest.raises(
        checkpoint.CheckpointError,
        match=r"in use by process 1 on elsewhere, .* cannot be checked from here: .*if you know that run is gone, "
        f"remove {tmp_path.absolute() / 'lock'}",
    ):
        checkpoint.WorkdirLock(tmp_path).__enter__()


def test_sigterm_while_the_lock_is_held_exits_143_and_removes_it(tmp_path):
    with pytest.raises(SystemExit) as exited, checkpoint.WorkdirLock(tmp_path):
        os.kill(os.getpid(), signal.SIGTERM)
    assert exited.value.code == 143
    assert not (tmp_path / "lock").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
