"""launch/: the Cloud TPU pod script (its dry-run gcloud commands; its worker scripts, and `watch` against
a gcloud that plays a one-worker TPU, run here in a fake worker home) and the SLURM script (run under
bash with srun, scontrol and python stubbed)."""

import contextlib
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

import jax
import pytest

from perflow_jax import sharding, training

ROOT = Path(__file__).resolve().parents[1]
TPU_SCRIPT = ROOT / "launch/tpu_pod.sh"
SLURM_SCRIPT = ROOT / "launch/slurm_gpu.sbatch"


def tpu(*args, **env):
    """Run launch/tpu_pod.sh with DRY_RUN=1 and PROJECT=my-proj (plus ``env``); returns the process."""
    environment = {**os.environ, "PROJECT": "my-proj", "DRY_RUN": "1", **env}
    return subprocess.run(["bash", str(TPU_SCRIPT), *args], capture_output=True, text=True, env=environment,
                          timeout=60)  # fmt: skip


def commands(stdout: str) -> list[list[str]]:
    """The dry run's printed commands ("+ gcloud ..."; a worker script spans lines), as argument lists."""
    blocks = stdout.replace("\n+ ", "\0+ ").split("\0")
    return [shlex.split(block[2:]) for block in blocks if block.startswith("+ ")]


def worker_script(argv: list[str]) -> str:
    """The script a `gcloud compute tpus tpu-vm ssh --command="bash -c '...'"` runs on the workers."""
    (command,) = [a.removeprefix("--command=") for a in argv if a.startswith("--command=")]
    (script,) = shlex.split(command)[2:]
    return script


@pytest.mark.parametrize("script", [TPU_SCRIPT, SLURM_SCRIPT], ids=lambda p: p.name)
def test_script_is_valid_bash(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# --- launch/tpu_pod.sh: the gcloud commands --------------------------------------------------------


def test_spot_create_requests_a_spot_queued_resource():
    result = tpu("create", ZONE="us-east5-b")
    assert result.returncode == 0, result.stderr
    assert commands(result.stdout) == [
        ["gcloud", "compute", "tpus", "queued-resources", "create", "perflow-qr", "--node-id=perflow",
         "--accelerator-type=v5litepod-16", "--runtime-version=v2-alpha-tpuv5-lite", "--spot",
         "--project=my-proj", "--zone=us-east5-b", "--quiet"],
    ]  # fmt: skip


def test_on_demand_create_creates_a_tpu_vm_with_extra_flags():
    result = tpu("create", SPOT="0", TPU_NAME="pod", ACCELERATOR_TYPE="v4-32", CREATE_FLAGS="--reserved --network=n")
    assert result.returncode == 0, result.stderr
    assert commands(result.stdout) == [
        ["gcloud", "compute", "tpus", "tpu-vm", "create", "pod", "--accelerator-type=v4-32",
         "--version=tpu-ubuntu2204-base", "--reserved", "--network=n", "--project=my-proj", "--zone=us-west4-a",
         "--quiet"],
    ]  # fmt: skip


@pytest.mark.parametrize(
    "accelerator, runtime",
    [("v6e-16", "v2-alpha-tpuv6e"), ("v5p-32", "v2-alpha-tpuv5"), ("v5litepod-64", "v2-alpha-tpuv5-lite"),
     ("v4-8", "tpu-ubuntu2204-base")],
)  # fmt: skip
def test_runtime_version_follows_the_accelerator(accelerator, runtime):
    (create,) = commands(tpu("create", ACCELERATOR_TYPE=accelerator).stdout)
    assert f"--runtime-version={runtime}" in create


def test_best_effort_uses_the_alpha_queued_resource_tier():
    (create,) = commands(tpu("create", BEST_EFFORT="1").stdout)
    assert create[:6] == ["gcloud", "alpha", "compute", "tpus", "queued-resources", "create"]
    assert "--best-effort" in create and "--spot" not in create


def test_setup_copies_the_checkout_and_installs_requirements_on_every_worker():
    result = tpu("setup", BUCKET="gs://my-bucket")
    assert result.returncode == 0, result.stderr
    scp, ssh = [c for c in commands(result.stdout) if c[0] == "gcloud"]
    assert scp[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "TEMPORARY_FOLDER/perflow_code.tar.gz"]
    assert "perflow:perflow_code.tar.gz" in scp and "--worker=all" in scp
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "perflow"] and "--worker=all" in ssh
    script = worker_script(ssh)
    assert "\nBUCKET=my-bucket MOUNT=/mnt/perflow " in script
    assert 'gcsfuse $GCSFUSE_FLAGS "$BUCKET" "$MOUNT"' in script
    assert '"$venv/bin/pip" install -q -r "$code/requirements-tpu.txt"' in script
    assert '"$venv/bin/pip" install -q --no-deps -e "$code"' in script


def test_train_starts_the_same_command_on_all_workers_at_once():
    result = tpu("train", "--config.train.num_steps=4000", "--verbose", BUCKET="b", MOUNT="/mnt/b")
    assert result.returncode == 0, result.stderr
    (ssh,) = commands(result.stdout)
    assert "--worker=all" in ssh
    assert (
        'setsid nohup bash "$logs/wrapper.sh" "$venv/bin/python" -m perflow_jax.train '
        "--config=configs/sd15.py --workdir=/mnt/b/runs/perflow --config.model.path=/mnt/b/converted/sd15 "
        "--config.data.path=/mnt/b/data/sd15-512 --config.tpu_pod=True --config.train.num_steps=4000 --verbose "
        '> "$log" 2>&1 < /dev/null &'
    ) in worker_script(ssh)


def test_prepare_runs_prepare_data_on_all_workers_into_data():
    result = tpu("prepare", "--input=/mnt/b/laion/*.tar", "--resolution=512", BUCKET="b", MOUNT="/mnt/b")
    assert result.returncode == 0, result.stderr
    (ssh,) = commands(result.stdout)
    assert "--worker=all" in ssh
    assert (
        '"$venv/bin/python" -m perflow_jax.prepare_data --model=/mnt/b/converted/sd15 --out=/mnt/b/data/sd15-512 '
        '--tpu-pod --input=/mnt/b/laion/\\*.tar --resolution=512 2>&1 | tee "$log"'
    ) in worker_script(ssh)


@pytest.mark.parametrize("arg", ["--out=/mnt/perflow/elsewhere", "--tpu-pod", "laion"])
def test_prepare_refuses_the_flags_it_sets_and_arguments_that_are_not_flags(arg):
    result = tpu("prepare", "--resolution=512", arg)
    assert result.returncode == 2 and commands(result.stdout) == []
    assert ("prepare sets" if arg.startswith("--") else "give prepare_data's flags as --FLAG=VALUE") in result.stderr


def test_watch_recreates_a_preempted_resource_and_starts_training_again():
    result = tpu("watch", REPO="https://example.com/perflow.git", REF="v1")
    assert result.returncode == 0, result.stderr
    steps = [" ".join(c[:6]) for c in commands(result.stdout)]
    assert steps == [
        "gcloud compute tpus queued-resources delete perflow-qr",
        "gcloud compute tpus queued-resources create perflow-qr",
        "gcloud compute tpus tpu-vm ssh perflow",
        "gcloud compute tpus tpu-vm ssh perflow",
    ]
    setup, train = (worker_script(c) for c in commands(result.stdout)[2:])
    assert "REPO=https://example.com/perflow.git REF=v1" in setup
    assert "--config.tpu_pod=True" in train


def test_a_gs_workdir_and_model_go_to_train_as_urls():
    result = tpu("train", WORKDIR="gs://bkt/runs/a", MODEL="gs://bkt/converted/sd15", BUCKET="bkt")
    assert result.returncode == 0, result.stderr
    script = worker_script(commands(result.stdout)[0])
    assert "--workdir=gs://bkt/runs/a --config.model.path=gs://bkt/converted/sd15 " in script
    assert "run_logs=gs://bkt/runs/a/logs" in script


def test_gs_data_is_refused_with_the_mount_to_use():
    result = tpu("train", DATA="gs://bkt/data/a")
    assert result.returncode == 2
    assert "the prepared data is read from a local disk (ArrayRecord reads no gs://)" in result.stderr
    assert "BUCKET=bkt and use DATA=/mnt/perflow/data/a" in result.stderr


def test_train_refuses_arguments_other_than_config_overrides():
    result = tpu("train", "--workdir=/elsewhere")
    assert result.returncode == 2
    assert "give training settings as --config.KEY=VALUE" in result.stderr


# --- launch/tpu_pod.sh: the worker scripts, run in a fake worker home ------------------------------

FAKE_TRAIN = r"""#!/bin/bash
# Stands in for the virtualenv's python: records its arguments, then runs until SIGTERM (mode run)
# or exits at once with status N (mode exit-N).
trap 'echo "stopped at step 3 on request; the checkpoint of step 3 resumes the run"; exit 143' TERM
printf '%s\n' "$@" > "$HOME/train_args.new" && mv "$HOME/train_args.new" "$HOME/train_args"
case $FAKE_TRAIN_MODE in
  run) while true; do sleep 0.05; done ;;
  exit-*) echo "exit ${FAKE_TRAIN_MODE#exit-}"; exit "${FAKE_TRAIN_MODE#exit-}" ;;
esac
"""


@pytest.fixture
def worker(tmp_path):
    """(home, run) of a fake TPU worker: a virtualenv whose python is FAKE_TRAIN, a code folder and a WORKDIR."""
    home, workdir = tmp_path / "home", tmp_path / "run"
    (home / "perflow_venv/bin").mkdir(parents=True)
    (home / "perflow_jax").mkdir()
    python = home / "perflow_venv/bin/python"
    python.write_text(FAKE_TRAIN)
    python.chmod(0o755)
    yield home, workdir
    group = home / "perflow_logs/train.pgid"
    if group.exists():  # a test that failed midway leaves its fake training running
        with contextlib.suppress(ProcessLookupError):
            os.killpg(int(group.read_text()), signal.SIGKILL)


def on_worker(
    home: Path, command: str, mode: str = "run", bin: Path | None = None, args: tuple[str, ...] = (), **env
) -> str:
    """Run the worker script of `launch/tpu_pod.sh COMMAND ARGS` with HOME=home (and ``bin`` first on the
    PATH); returns its stdout."""
    settings = {"WORKDIR": str(home.parent / "run"), "STOP_WAIT": "20", **env}
    (ssh,) = [c for c in commands(tpu(command, *args, **settings).stdout) if "ssh" in c]
    environment = {**os.environ, "HOME": str(home), "FAKE_TRAIN_MODE": mode}
    if bin is not None:
        environment["PATH"] = f"{bin}:{os.environ['PATH']}"
    result = subprocess.run(["bash", "-c", worker_script(ssh)], capture_output=True, text=True, env=environment,
                            timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout


def wait_for(path: Path, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def settled_status(home: Path, seconds: float = 10.0) -> list[str]:
    """The worker's state once its training wrapper has exited (it outlives train.py by a log copy)."""
    deadline = time.monotonic() + seconds
    while (state := on_worker(home, "status").split()[2:]) == ["running"]:
        assert time.monotonic() < deadline, "training still running"
        time.sleep(0.05)
    return state


def test_worker_start_runs_the_train_command_in_the_background(worker):
    home, workdir = worker
    on_worker(home, "train")
    wait_for(home / "perflow_logs/train.pid")
    wait_for(home / "train_args")
    assert (home / "train_args").read_text().split() == [
        "-m", "perflow_jax.train", "--config=configs/sd15.py", f"--workdir={workdir}",
        "--config.model.path=/mnt/perflow/converted/sd15", "--config.data.path=/mnt/perflow/data/sd15-512",
        "--config.tpu_pod=True",
    ]  # fmt: skip
    assert on_worker(home, "status").split()[2:] == ["running"]
    on_worker(home, "stop")


def test_worker_stop_sends_sigterm_and_keeps_the_log_in_the_workdir(worker):
    home, workdir = worker
    on_worker(home, "train")
    wait_for(home / "perflow_logs/train.pid")
    wait_for(home / "train_args")
    assert on_worker(home, "stop").split()[1:] == ["stopped"]
    assert settled_status(home) == ["stopped"]
    (saved,) = (workdir / "logs").iterdir()
    assert "stopped at step 3 on request" in saved.read_text()


def test_worker_stop_with_a_gs_workdir_copies_the_log_there_with_gcloud_storage(worker):
    home, _ = worker
    fake = home.parent / "fake-bin"
    fake.mkdir()
    (fake / "gcloud").write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$HOME/gcloud_args"\n')
    (fake / "gcloud").chmod(0o755)
    on_worker(home, "train", bin=fake, WORKDIR="gs://bkt/runs/a")
    wait_for(home / "train_args")
    assert "--workdir=gs://bkt/runs/a" in (home / "train_args").read_text().split()
    on_worker(home, "stop", WORKDIR="gs://bkt/runs/a")
    assert settled_status(home) == ["stopped"]
    log = (home / "perflow_logs/train.log").resolve()
    host = os.uname().nodename
    assert (home / "gcloud_args").read_text().split() == [
        "storage", "cp", "-q", str(log), f"gs://bkt/runs/a/logs/{host}-{log.name}"
    ]  # fmt: skip


def test_worker_status_reports_the_failed_exit_status(worker):
    home, _ = worker
    on_worker(home, "train", mode="exit-3")
    assert settled_status(home) == ["failed", "3"]


def test_worker_prepare_runs_prepare_data_in_the_code_folder_and_keeps_a_log(worker):
    home, _ = worker
    output = on_worker(home, "prepare", mode="exit-0", args=("--input=/mnt/perflow/images", "--resolution=512"))
    assert (home / "train_args").read_text().split() == [
        "-m",
        "perflow_jax.prepare_data",
        "--model=/mnt/perflow/converted/sd15",
        "--out=/mnt/perflow/data/sd15-512",
        "--tpu-pod",
        "--input=/mnt/perflow/images",
        "--resolution=512",
    ]
    (log,) = (home / "perflow_logs").glob("prepare-*.log")
    assert output == log.read_text() == "exit 0\n"


def test_checkout_is_packed_without_ignored_files(tmp_path):
    tarball = tmp_path / "code.tar.gz"
    script = f"source {shlex.quote(str(TPU_SCRIPT))} && pack_checkout {shlex.quote(str(tarball))}"
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env={**os.environ, "PROJECT": "p"})
    assert result.returncode == 0, result.stderr
    names = set(subprocess.run(["tar", "-tzf", str(tarball)], capture_output=True, text=True).stdout.split())
    assert {"launch/tpu_pod.sh", "requirements-tpu.txt", "perflow_jax/train.py", "configs/sd15.py"} <= names
    assert not [name for name in names if name.startswith((".venv/", ".git/")) or "__pycache__" in name]


def test_worker_setup_unpacks_the_checkout_and_installs_requirements(worker, tmp_path):
    home, _ = worker
    source = tmp_path / "checkout"
    source.mkdir()
    (source / "requirements-tpu.txt").write_text("jax[tpu]\n")
    subprocess.run(["tar", "-C", str(source), "-czf", str(home / "perflow_code.tar.gz"), "."], check=True)
    pip = home / "perflow_venv/bin/pip"
    pip.write_text('#!/bin/bash\necho "$*" >> "$HOME/pip_calls"\n')
    pip.chmod(0o755)
    output = on_worker(home, "setup", mode="", BUCKET="")
    assert (home / "perflow_jax/requirements-tpu.txt").read_text() == "jax[tpu]\n"
    assert (home / "pip_calls").read_text().splitlines() == [
        f"install -q -r {home}/perflow_jax/requirements-tpu.txt",
        f"install -q --no-deps -e {home}/perflow_jax",
    ]
    assert output.split()[1:2] == ["ready,"]


def test_worker_status_before_setup_is_no_setup(tmp_path):
    assert on_worker(tmp_path, "status").split()[2:] == ["no-setup"]


# A gcloud that plays a one-worker TPU: `describe` answers the states in $FAKE_HOME/states one call at a
# time (the last one from then on; ABSENT is gcloud's NOT_FOUND error), `scp` copies into $FAKE_HOME,
# `ssh` runs the worker script with HOME=$FAKE_HOME. Calls other than describe and the status ssh are
# logged to $FAKE_HOME/gcloud_calls ("delete", "ssh setup", ...).
FAKE_GCLOUD = r"""#!/bin/bash
case "$4 $*" in
  describe*) ;;
  ssh*perflow-worker*) ;;
  ssh*wrapper.sh*) echo "ssh start" >> "$FAKE_HOME/gcloud_calls" ;;
  ssh*requirements-tpu.txt*) echo "ssh setup" >> "$FAKE_HOME/gcloud_calls" ;;
  ssh*kill\ -TERM*) echo "ssh stop" >> "$FAKE_HOME/gcloud_calls" ;;
  ssh*tail*) echo "ssh logs" >> "$FAKE_HOME/gcloud_calls" ;;
  *) echo "$4" >> "$FAKE_HOME/gcloud_calls" ;;
esac
case "$4" in
  describe)
    read -r state rest <<<"$(cat "$FAKE_HOME/states")"
    [[ -n $rest ]] && echo "$rest" > "$FAKE_HOME/states"
    if [[ $state == ABSENT ]]; then echo "ERROR: NOT_FOUND: queued resource not found" >&2; exit 1; fi
    echo "$state" ;;
  scp) cp "$5" "$FAKE_HOME/${6#*:}" ;;
  ssh)
    for arg in "$@"; do [[ $arg == --command=* ]] && command=${arg#--command=}; done
    HOME=$FAKE_HOME bash -c "$command" ;;
esac
"""


def watch(worker, states: str, mode: str, **env):
    """Run `launch/tpu_pod.sh watch` against FAKE_GCLOUD on the fake worker; returns (process, gcloud calls)."""
    home, workdir = worker
    fake = home.parent / "fake-bin"
    fake.mkdir()
    (fake / "gcloud").write_text(FAKE_GCLOUD)
    (fake / "gcloud").chmod(0o755)
    (home / "states").write_text(states)
    pip = home / "perflow_venv/bin/pip"
    pip.write_text("#!/bin/bash\n")
    pip.chmod(0o755)
    environment = {
        **os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "FAKE_HOME": str(home), "FAKE_TRAIN_MODE": mode,
        "PROJECT": "my-proj", "BUCKET": "", "WORKDIR": str(workdir), "POLL_SECONDS": "0.1", **env,
    }  # fmt: skip
    result = subprocess.run(["bash", str(TPU_SCRIPT), "watch", "--config.train.num_steps=7"], capture_output=True,
                            text=True, env=environment, timeout=120)  # fmt: skip
    return result, (home / "gcloud_calls").read_text().splitlines()


def test_watch_recreates_a_preempted_tpu_trains_to_the_end_and_deletes_it(worker):
    result, calls = watch(worker, "SUSPENDED ACTIVE", mode="exit-0")
    assert result.returncode == 0, result.stderr
    assert calls == ["delete", "create", "scp", "ssh setup", "ssh start", "delete"]
    home, _ = worker
    assert (home / "perflow_jax/launch/tpu_pod.sh").read_text() == TPU_SCRIPT.read_text()
    assert "--config.train.num_steps=7" in (home / "train_args").read_text().split()


def test_watch_restarts_a_failed_run_then_gives_up(worker):
    result, calls = watch(worker, "ACTIVE", mode="exit-1", MAX_RESTARTS="1")
    assert result.returncode == 2
    assert "training failed 2 times without a preemption" in result.stderr
    assert calls == ["ssh start", "ssh logs", "ssh stop", "ssh start", "ssh logs"]


def test_watch_stops_when_train_refuses_the_settings(worker):
    result, calls = watch(worker, "ACTIVE", mode="exit-2")
    assert result.returncode == 2
    assert "train refused the run" in result.stderr
    assert calls == ["ssh start", "ssh logs"]


@pytest.mark.parametrize(
    "states, summary",
    [
        (["running", "running"], "running"),
        (["done", "done"], "done"),
        (["running", "failed 2"], "refused"),
        (["running", "failed 1"], "failed"),
        (["stopped", "stopped"], "stopped"),
        (["stopped", "failed 1"], "failed"),
        (["running", "idle"], "failed"),
        (["idle", "no-setup"], "no-setup"),
        ([], "unknown"),
    ],
)
def test_watch_sums_the_worker_states_up(states, summary):
    lines = "".join(f"perflow-worker w-{i} {state}\n" for i, state in enumerate(states))
    result = subprocess.run(
        ["bash", "-c", f'source {shlex.quote(str(TPU_SCRIPT))} && summarize <<<"$LINES"'],
        capture_output=True, text=True, env={**os.environ, "PROJECT": "p", "LINES": lines.rstrip()},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == summary


def test_the_stopped_exit_codes_watch_resumes_are_the_ones_train_exits_with():
    assert 'STOPPED_CODES="143 130"' in TPU_SCRIPT.read_text()
    assert [training.Stopped(1, s).exit_code for s in (signal.SIGTERM, signal.SIGINT)] == [143, 130]


# --- launch/slurm_gpu.sbatch --------------------------------------------------------------------------

STUBS = {
    # srun: runs the task command once per node with that node's SLURM_PROCID; on one node it becomes
    # the task (exec), so signals sent to srun reach the task as real srun forwards them.
    "srun": r"""#!/bin/bash
while [[ $1 == --* ]]; do shift; done
if ((SLURM_NNODES == 1)); then SLURM_PROCID=0 exec "$@"; fi
for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_PROCID=$i "$@" || exit; done
""",
    "scontrol": r"""#!/bin/bash
case "$1 $2" in
  "show hostnames") printf '%s\n' gpu-a17 gpu-b03 ;;
  "requeue "*) echo "$2" > "$STUB_OUT/requeued" ;;
esac
""",
    # python: records its arguments and environment (NUL-separated); waits for SIGTERM if asked.
    "python": r"""#!/bin/bash
trap 'echo terminated > "$STUB_OUT/terminated"; exit 0' TERM
printf '%s\0' "$@" > "$STUB_OUT/task-$PERFLOW_PROCESS_ID.args"
env -0 > "$STUB_OUT/task-$PERFLOW_PROCESS_ID.env"
if [[ -n ${STUB_WAIT_FOR_TERM:-} ]]; then while true; do sleep 0.05; done; fi
""",
}


@pytest.fixture
def cluster(tmp_path):
    """The environment of a two-node SLURM job with the stubs first on PATH; they write into tmp_path/out."""
    stubs, out = tmp_path / "bin", tmp_path / "out"
    stubs.mkdir()
    out.mkdir()
    for name, text in STUBS.items():
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    return {
        **os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "STUB_OUT": str(out), "SLURM_JOB_ID": "4242",
        "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "gpu-[a17,b03]", "SLURM_SUBMIT_DIR": str(ROOT),
        "PERFLOW_PORT": "23456", "MODEL": "/shared/sd15", "DATA": "/shared/data", "WORKDIR": "/shared/runs/a",
    }  # fmt: skip


def slurm(env, *args):
    return subprocess.run(["bash", str(SLURM_SCRIPT), *args], capture_output=True, text=True, env=env, timeout=60)


def task_environment(out: Path, process: int) -> dict[str, str]:
    pairs = (entry.split("=", 1) for entry in (out / f"task-{process}.env").read_text().split("\0") if entry)
    return dict(pairs)


def test_slurm_gives_each_task_the_variables_sharding_reads(cluster):
    result = slurm(cluster)
    assert result.returncode == 0, result.stderr
    for process in (0, 1):
        env = task_environment(Path(cluster["STUB_OUT"]), process)
        assert env[sharding.COORDINATOR_ENV] == "gpu-a17:23456"
        assert env[sharding.NUM_PROCESSES_ENV] == "2"
        assert env[sharding.PROCESS_ID_ENV] == str(process)


def test_slurm_task_variables_start_jax_distributed_as_that_process(cluster, monkeypatch):
    assert slurm(cluster).returncode == 0
    env = task_environment(Path(cluster["STUB_OUT"]), 1)
    for name in (sharding.COORDINATOR_ENV, sharding.NUM_PROCESSES_ENV, sharding.PROCESS_ID_ENV):
        monkeypatch.setenv(name, env[name])
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    sharding.initialize_distributed(tpu_pod=False)
    assert calls == [{"coordinator_address": "gpu-a17:23456", "num_processes": 2, "process_id": 1}]


def test_slurm_runs_train_with_the_paths_and_overrides(cluster):
    assert slurm(cluster, "--config.train.num_steps=10").returncode == 0
    args = (Path(cluster["STUB_OUT"]) / "task-0.args").read_text().split("\0")[:-1]
    assert args == [
        "-m", "perflow_jax.train", "--config=configs/sd15.py", "--workdir=/shared/runs/a",
        "--config.model.path=/shared/sd15", "--config.data.path=/shared/data", "--config.train.num_steps=10",
    ]  # fmt: skip


def test_slurm_time_limit_signal_stops_training_and_requeues_the_job(cluster):
    env = {**cluster, "SLURM_NNODES": "1", "STUB_WAIT_FOR_TERM": "1"}
    out = Path(cluster["STUB_OUT"])
    job = subprocess.Popen(["bash", str(SLURM_SCRIPT)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(out / "task-0.env")
        job.send_signal(signal.SIGUSR1)
        assert job.wait(timeout=20) == 0
    finally:
        job.kill()
    assert (out / "terminated").read_text().strip() == "terminated"
    assert (out / "requeued").read_text().strip() == "4242"


@pytest.mark.parametrize("missing", ["MODEL", "DATA", "WORKDIR"])
def test_slurm_requires_the_paths(cluster, missing):
    del cluster[missing]
    result = slurm(cluster)
    assert result.returncode == 2
    assert f"{missing} is not set" in result.stderr


def test_slurm_refuses_gs_paths(cluster):
    result = slurm({**cluster, "WORKDIR": "gs://bucket/runs/a"})
    assert result.returncode == 2
    assert "gs:// paths are not supported yet" in result.stderr
