#!/usr/bin/env bash
# PeRFlow training on a Cloud TPU slice: create it, install this repository on every worker, prepare
# the data on all workers (`python -m perflow_jax.prepare_data ... --tpu-pod`), start
# `python -m perflow_jax.train ... --config.tpu_pod=True` on all workers at once, and keep a spot run
# going through preemptions (each restart resumes from WORKDIR's newest checkpoint).
#
#   launch/tpu_pod.sh [--dry-run] COMMAND [--config.KEY=VALUE ...] [--verbose]
#   launch/tpu_pod.sh [--dry-run] prepare --input=SRC --resolution=512 [--FLAG=VALUE ...]
#
# Settings come from environment variables; `launch/tpu_pod.sh help` lists them with their values.
# launch/README.md walks through a whole run.
# The worker scripts are written here with $VARIABLES for the workers to expand, in single quotes.
# shellcheck disable=SC2016
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# The copy of this checkout that setup unpacks on every worker (in its home).
REMOTE_TARBALL=perflow_code.tar.gz
# train.py's exit status when SIGTERM (143) or Ctrl-C (130) stopped it before the last step, with a checkpoint.
STOPPED_CODES="143 130"

usage() {
  cat <<EOF
Usage: launch/tpu_pod.sh [--dry-run] COMMAND [--config.KEY=VALUE ...] [--verbose]
       launch/tpu_pod.sh [--dry-run] prepare --input=SRC --resolution=512 [--FLAG=VALUE ...]

Commands:
  create   create the TPU (a queued resource when SPOT=1) and wait until it is ready
  setup    on every worker: mount BUCKET at MOUNT, install the code and requirements-tpu.txt
  prepare  python -m perflow_jax.prepare_data --model=MODEL --out=DATA --tpu-pod and the flags given,
           on every worker at once (each its own shards, one data set in DATA); waits until all are
           done, a log per worker in ~/perflow_logs; run again, it resumes
  train    start training on every worker at once (nohup; a log per worker in ~/perflow_logs)
  watch    keep the run going: create and set up the TPU if it is missing, (re)start training,
           re-create the TPU after a preemption, restart a failed run (MAX_RESTARTS times);
           returns when training has finished (and deletes the TPU if DELETE_WHEN_DONE=1)
  status   the TPU's state and each worker's training state
  logs     the last LOG_LINES lines of every worker's log
  stop     SIGTERM to training on every worker (it saves a checkpoint), SIGKILL after STOP_WAIT s
  delete   delete the TPU (and its queued resource); WORKDIR on the bucket stays
  help     this text

--config.KEY=VALUE arguments (train, watch) go to python -m perflow_jax.train; give the same ones on
every restart, or train refuses the WORKDIR. --verbose goes there too (Orbax's and JAX's INFO logs). --dry-run (or DRY_RUN=1) prints the gcloud commands
instead of running them.

Settings: environment variables (current value after =)
EOF
  setting PROJECT "Google Cloud project (default: gcloud's configured project)"
  setting ZONE "a zone that has ACCELERATOR_TYPE"
  setting TPU_NAME "the TPU VM (node) name"
  setting QUEUED_RESOURCE "the queued resource's name (SPOT=1)"
  setting ACCELERATOR_TYPE "e.g. v5litepod-16, v6e-16, v5p-16, v4-32"
  setting RUNTIME_VERSION "default from ACCELERATOR_TYPE: v2-alpha-tpuv6e (v6e), v2-alpha-tpuv5 (v5p),
v2-alpha-tpuv5-lite (v5e), tpu-ubuntu2204-base (v4 and older)"
  setting SPOT "1: spot capacity through a queued resource (preemptible; watch re-creates it);
0: an on-demand TPU VM (gcloud compute tpus tpu-vm create)"
  setting BEST_EFFORT "1 (with SPOT=1): the best-effort tier instead of spot (gcloud alpha)"
  setting CREATE_FLAGS "more flags for the create command, e.g. --reserved, --network=NET,
--service-account=SA, --scopes=https://www.googleapis.com/auth/cloud-platform"
  setting REPO "a git URL every worker clones at REF; empty: copy this checkout (tracked, and untracked
but not ignored, files) to every worker"
  setting REF "branch, tag or commit of REPO"
  setting BUCKET "Cloud Storage bucket mounted with gcsfuse at MOUNT on every worker (for DATA, and any
path under MOUNT); empty: mount nothing (local paths must then be on a file system all workers share)"
  setting MOUNT "where BUCKET is mounted on the workers"
  setting GCSFUSE_FLAGS "gcsfuse flags: Orbax commits a checkpoint by renaming its folder (keep
--rename-dir-limit), and one worker must see at once what another has just written (no negative cache)"
  setting WORKDIR "checkpoints, metrics, samples, logs/: a gs:// URL (written directly), or a folder on
the shared mount"
  setting MODEL "converted folder (a gs:// URL or a folder), or a diffusers folder, readable on every worker"
  setting DATA "prepared data folder (python -m perflow_jax.prepare_data), readable on every worker: a
folder (the bucket mounted at MOUNT, or a shared disk), not gs:// (ArrayRecord reads a local disk);
prepare writes it"
  setting CONFIG "training config, relative to the repository"
  setting PYTHON_VERSION "Python of the workers' virtualenv (uv installs it)"
  setting POLL_SECONDS "watch: seconds between checks"
  setting MAX_RESTARTS "watch: restarts of a failed run (preemptions do not count)"
  setting DELETE_WHEN_DONE "watch: 1 deletes the TPU when training has finished"
  setting STOP_WAIT "stop: seconds to wait for the checkpoint before SIGKILL"
  setting LOG_LINES "logs: lines per worker"
  setting DRY_RUN "1: print the gcloud commands instead of running them"
}

# One setting of the usage text: NAME=value, then its description indented.
setting() {
  printf '  %s=%s\n' "$1" "${!1}"
  printf '%s\n' "$2" | sed 's/^/      /'
}

default_runtime_version() {
  case $1 in
    v6e-*) echo v2-alpha-tpuv6e ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    *) echo tpu-ubuntu2204-base ;;
  esac
}

PROJECT=${PROJECT:-}
if [[ -z $PROJECT ]] && command -v gcloud >/dev/null; then
  PROJECT=$(gcloud config get-value project 2>/dev/null || true)
fi
ZONE=${ZONE:-us-west4-a}
TPU_NAME=${TPU_NAME:-perflow}
QUEUED_RESOURCE=${QUEUED_RESOURCE:-$TPU_NAME-qr}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v5litepod-16}
RUNTIME_VERSION=${RUNTIME_VERSION:-$(default_runtime_version "$ACCELERATOR_TYPE")}
SPOT=${SPOT:-1}
BEST_EFFORT=${BEST_EFFORT:-0}
CREATE_FLAGS=${CREATE_FLAGS:-}
REPO=${REPO:-}
REF=${REF:-main}
BUCKET=${BUCKET:-}
BUCKET=${BUCKET#gs://}
MOUNT=${MOUNT:-/mnt/perflow}
GCSFUSE_FLAGS=${GCSFUSE_FLAGS:---implicit-dirs --rename-dir-limit=200000 --metadata-cache-negative-ttl-secs=0}
WORKDIR=${WORKDIR:-$MOUNT/runs/$TPU_NAME}
MODEL=${MODEL:-$MOUNT/converted/sd15}
DATA=${DATA:-$MOUNT/data/sd15-512}
CONFIG=${CONFIG:-configs/sd15.py}
PYTHON_VERSION=${PYTHON_VERSION:-3.11}
POLL_SECONDS=${POLL_SECONDS:-60}
MAX_RESTARTS=${MAX_RESTARTS:-5}
DELETE_WHEN_DONE=${DELETE_WHEN_DONE:-1}
STOP_WAIT=${STOP_WAIT:-300}
LOG_LINES=${LOG_LINES:-20}
DRY_RUN=${DRY_RUN:-0}

say() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() {
  printf 'error: %s\n' "$*" >&2
  exit 2
}

# Print a command as a shell would read it back: "+ gcloud ... '--command=...'".
show() {
  local line="+" arg
  for arg in "$@"; do
    if [[ $arg =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then
      line+=" $arg"
    else
      line+=" '${arg//\'/\'\\\'\'}'"
    fi
  done
  printf '%s\n' "$line"
}

# Run a command that changes something; DRY_RUN prints it instead.
run() {
  if [[ $DRY_RUN == 1 ]]; then
    show "$@"
  else
    "$@"
  fi
}

gcloud_tpu() { run gcloud "$@" --project="$PROJECT" --zone="$ZONE" --quiet; }

check_settings() {
  [[ -n $PROJECT ]] || die "no Google Cloud project: set PROJECT=... (or gcloud config set project ...)"
  [[ $SPOT == 0 || $SPOT == 1 ]] || die "SPOT=$SPOT: use 1 (spot, queued resource) or 0 (on-demand TPU VM)"
  [[ $BEST_EFFORT == 0 || $SPOT == 1 ]] || die "BEST_EFFORT=1 is a queued-resource tier: use it with SPOT=1"
  local name value bucket
  for name in WORKDIR MODEL DATA; do
    value=${!name}
    if [[ $value == gs://* && $name == DATA ]]; then
      bucket=${value#gs://}
      bucket=${bucket%%/*}
      die "$name=$value: the prepared data is read from a local disk (ArrayRecord reads no gs://); mount the \
bucket on every worker with BUCKET=$bucket and use $name=$MOUNT${value#gs://"$bucket"}"
    fi
    [[ $value == /* || $value == gs://?* ]] || die "$name=$value: give a gs:// URL or an absolute path on the \
workers, e.g. under MOUNT=$MOUNT"
  done
  [[ $MOUNT == /* ]] || die "MOUNT=$MOUNT: give an absolute path, e.g. /mnt/perflow"
  for name in BUCKET MOUNT GCSFUSE_FLAGS REPO REF PYTHON_VERSION WORKDIR MODEL DATA CONFIG STOP_WAIT LOG_LINES; do
    check_portable "$name=${!name}"
  done
}

# The workers get values inside bash -c '...': no single quotes, no newlines.
check_portable() {
  [[ $1 != *"'"* && $1 != *$'\n'* ]] || die "$1: single quotes and newlines cannot go to the workers; leave them out"
}

# Extra arguments for train.py must be --config.KEY=VALUE or --verbose (the script sets --config, --workdir itself).
check_overrides() {
  local arg
  for arg in "$@"; do
    [[ $arg == --config.?*=* || $arg == --verbose ]] || die "unexpected argument '$arg': give training settings as --config.KEY=VALUE \
(CONFIG, WORKDIR, MODEL and DATA are environment variables)"
    check_portable "$arg"
  done
}

# Extra arguments for prepare_data must be --FLAG=VALUE or --FLAG, not the ones the script sets.
check_prepare_args() {
  local arg
  for arg in "$@"; do
    [[ $arg == --?* ]] || die "unexpected argument '$arg': give prepare_data's flags as --FLAG=VALUE, e.g. \
--input=$MOUNT/laion/*.tar --resolution=512"
    case ${arg%%=*} in
      --model | --out | --tpu-pod) die "$arg: prepare sets ${arg%%=*} itself (MODEL and DATA are environment variables)" ;;
    esac
    check_portable "$arg"
  done
}

# A value (checked by check_portable) shell-quoted for the workers' scripts, without single quotes.
remote_value() {
  if [[ -z $1 ]]; then printf '""'; else printf '%q' "$1"; fi
}

# Run a script on every worker at once, after the prelude below.
on_workers() {
  local script
  script="$(worker_prelude)
$1"
  [[ $script != *"'"* ]] || die "internal: a worker script holds a single quote"
  gcloud_tpu compute tpus tpu-vm ssh "$TPU_NAME" --worker=all --command="bash -c '$script'"
}

# Every worker script starts with the paths in the worker's home (code, virtualenv, logs, the copied
# checkout) and running: whether training (its wrapper's process group) is alive, a zombie not counted.
worker_prelude() {
  printf 'code=$HOME/perflow_jax venv=$HOME/perflow_venv logs=$HOME/perflow_logs tarball=$HOME/%s\n' \
    "$REMOTE_TARBALL"
  cat <<'EOF'
running() {
  local group
  group=$(cat "$logs/train.pgid" 2>/dev/null) || return 1
  kill -0 "$group" 2>/dev/null && ! grep -qs "^State:.*zombie" "/proc/$group/status"
}
EOF
}

# --- the resource ---------------------------------------------------------------------------------

# ACTIVE / READY when usable; ABSENT when it does not exist; UNKNOWN when gcloud could not tell.
resource_state() {
  local output
  if [[ $DRY_RUN == 1 ]]; then
    echo "DRY_RUN (not asked)"
    return
  fi
  if [[ $SPOT == 1 ]]; then
    output=$(gcloud compute tpus queued-resources describe "$QUEUED_RESOURCE" --project="$PROJECT" --zone="$ZONE" \
      --format='value(state.state)' 2>&1) && { echo "$output"; return; }
  else
    output=$(gcloud compute tpus tpu-vm describe "$TPU_NAME" --project="$PROJECT" --zone="$ZONE" \
      --format='value(state)' 2>&1) && { echo "$output"; return; }
  fi
  if [[ $output == *NOT_FOUND* || $output == *"not found"* ]]; then echo ABSENT; else
    say "could not read the TPU's state: $output"
    echo UNKNOWN
  fi
}

create_resource() {
  local extra=()
  read -ra extra <<<"$CREATE_FLAGS"
  if [[ $SPOT == 0 ]]; then
    gcloud_tpu compute tpus tpu-vm create "$TPU_NAME" --accelerator-type="$ACCELERATOR_TYPE" \
      --version="$RUNTIME_VERSION" "${extra[@]}"
  elif [[ $BEST_EFFORT == 1 ]]; then
    gcloud_tpu alpha compute tpus queued-resources create "$QUEUED_RESOURCE" --node-id="$TPU_NAME" \
      --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION" --best-effort "${extra[@]}"
  else
    gcloud_tpu compute tpus queued-resources create "$QUEUED_RESOURCE" --node-id="$TPU_NAME" \
      --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION" --spot "${extra[@]}"
  fi
}

delete_resource() {
  if [[ $SPOT == 1 ]]; then
    gcloud_tpu compute tpus queued-resources delete "$QUEUED_RESOURCE" --force
  else
    gcloud_tpu compute tpus tpu-vm delete "$TPU_NAME"
  fi
}

# Wait until the TPU is usable; fails if its request failed.
wait_ready() {
  if [[ $DRY_RUN == 1 ]]; then
    say "dry run: would wait until $(resource_label) is ACTIVE / READY"
    return
  fi
  local state last=""
  while true; do
    state=$(resource_state)
    [[ $state != "$last" ]] && say "$(resource_label): $state"
    last=$state
    case $state in
      ACTIVE | READY) return 0 ;;
      FAILED | SUSPENDED | PREEMPTED | TERMINATED | ABSENT) return 1 ;;
    esac
    sleep "$POLL_SECONDS"
  done
}

resource_label() {
  if [[ $SPOT == 1 ]]; then echo "queued resource $QUEUED_RESOURCE"; else echo "TPU VM $TPU_NAME"; fi
}

cmd_create() {
  if [[ $DRY_RUN != 1 ]]; then
    local state
    state=$(resource_state)
    if [[ $state != ABSENT ]]; then
      say "$(resource_label) exists already ($state); delete it first to create it anew"
      wait_ready || die "$(resource_label) is $state: launch/tpu_pod.sh delete, then create"
      return
    fi
  fi
  say "creating $(resource_label): $ACCELERATOR_TYPE, runtime $RUNTIME_VERSION, in $ZONE"
  create_resource
  wait_ready || die "$(resource_label) did not become ready: see gcloud's message above; delete it and try another \
zone or time (launch/tpu_pod.sh delete)"
}

# --- the workers ----------------------------------------------------------------------------------

setup_script() {
  printf 'BUCKET=%s MOUNT=%s GCSFUSE_FLAGS=%s REPO=%s REF=%s PYTHON_VERSION=%s\n' \
    "$(remote_value "$BUCKET")" "$(remote_value "$MOUNT")" "$(remote_value "$GCSFUSE_FLAGS")" \
    "$(remote_value "$REPO")" "$(remote_value "$REF")" "$(remote_value "$PYTHON_VERSION")"
  cat <<'EOF'
set -euo pipefail
if running; then echo "$(hostname): training is running; stop it first (launch/tpu_pod.sh stop)" >&2; exit 1; fi
if [ -n "$BUCKET" ] && ! mountpoint -q "$MOUNT"; then
  if ! command -v gcsfuse >/dev/null; then
    echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -c -s) main" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
    curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null
    sudo apt-get update -q
    sudo apt-get install -y -q gcsfuse
  fi
  sudo mkdir -p "$MOUNT"
  sudo chown "$(id -u):$(id -g)" "$MOUNT"
  gcsfuse $GCSFUSE_FLAGS "$BUCKET" "$MOUNT"
fi
if [ -n "$REPO" ]; then
  [ -d "$code/.git" ] || git clone -q "$REPO" "$code"
  git -C "$code" fetch -q origin "$REF"
  git -C "$code" checkout -q --detach FETCH_HEAD
else
  rm -rf "$code"
  mkdir -p "$code"
  tar -xzf "$tarball" -C "$code"
fi
if [ ! -x "$venv/bin/python" ]; then
  python3 -m pip install -q --user uv
  "$HOME/.local/bin/uv" venv -q --seed --python "$PYTHON_VERSION" "$venv"
fi
"$venv/bin/pip" install -q -r "$code/requirements-tpu.txt"
"$venv/bin/pip" install -q --no-deps -e "$code"
echo "$(hostname): ready, $("$venv/bin/python" --version)"
EOF
}

# The checkout's files (tracked, and untracked but not ignored) as a tarball for the workers.
pack_checkout() {
  local tarball=$1
  if [[ $DRY_RUN == 1 ]]; then
    printf '+ tar -C %s -czf %s <the files git ls-files --cached --others --exclude-standard lists>\n' \
      "$ROOT" "$tarball"
    return
  fi
  local files=() file
  while IFS= read -r -d '' file; do
    [[ -e $ROOT/$file ]] && files+=("$file")
  done < <(git -C "$ROOT" ls-files -z --cached --others --exclude-standard)
  tar -C "$ROOT" -czf "$tarball" -- "${files[@]}"
}

cmd_setup() {
  [[ -n $BUCKET ]] || say "BUCKET is empty: nothing is mounted; WORKDIR, MODEL and DATA must be gs:// URLs (not \
DATA) or on a file system every worker shares"
  if [[ -z $REPO ]]; then
    local folder=TEMPORARY_FOLDER
    [[ $DRY_RUN == 1 ]] || folder=$(mktemp -d)
    say "copying this checkout ($ROOT) to every worker"
    pack_checkout "$folder/$REMOTE_TARBALL" || return
    gcloud_tpu compute tpus tpu-vm scp "$folder/$REMOTE_TARBALL" "$TPU_NAME:$REMOTE_TARBALL" --worker=all || return
    [[ $DRY_RUN == 1 ]] || rm -rf "$folder"
  fi
  say "setting up every worker of $TPU_NAME (mount, code, Python $PYTHON_VERSION, requirements-tpu.txt)"
  on_workers "$(setup_script)"
}

start_script() {
  local arg train=("-m" "perflow_jax.train" "--config=$CONFIG" "--workdir=$WORKDIR" "--config.model.path=$MODEL"
    "--config.data.path=$DATA" "--config.tpu_pod=True" "$@")
  printf 'run_logs=%s\n' "$(remote_value "$WORKDIR/logs")"
  cat <<'EOF'
set -euo pipefail
mkdir -p "$logs"
if running; then echo "$(hostname): training is running already; stop it first (launch/tpu_pod.sh stop)" >&2; exit 1; fi
rm -f "$logs/train.rc" "$logs/train.pid"
log=$logs/train-$(date -u +%Y%m%dT%H%M%SZ).log
ln -sfn "$log" "$logs/train.log"
cat > "$logs/wrapper.sh" <<"WRAPPER"
"$@" &
echo $! > "$PERFLOW_LOGS/train.pid.new" && mv "$PERFLOW_LOGS/train.pid.new" "$PERFLOW_LOGS/train.pid"
wait $!
echo $? > "$PERFLOW_LOGS/train.rc.new" && mv "$PERFLOW_LOGS/train.rc.new" "$PERFLOW_LOGS/train.rc"
case $PERFLOW_RUN_LOGS in
  gs://*) gcloud storage cp -q "$PERFLOW_LOG" "$PERFLOW_RUN_LOGS/$(hostname)-${PERFLOW_LOG##*/}" || true ;;
  *) mkdir -p "$PERFLOW_RUN_LOGS" && cp "$PERFLOW_LOG" "$PERFLOW_RUN_LOGS/$(hostname)-${PERFLOW_LOG##*/}" || true ;;
esac
WRAPPER
cd "$code"
export PYTHONUNBUFFERED=1 PERFLOW_LOGS="$logs" PERFLOW_LOG="$log" PERFLOW_RUN_LOGS="$run_logs"
EOF
  printf 'setsid nohup bash "$logs/wrapper.sh" "$venv/bin/python"'
  for arg in "${train[@]}"; do printf ' %s' "$(remote_value "$arg")"; done
  printf ' > "$log" 2>&1 < /dev/null &\n'
  cat <<'EOF'
echo $! > "$logs/train.pgid"
echo "$(hostname): training started, log $log"
EOF
}

# prepare_data on this worker, in the foreground; its output also goes to a log in ~/perflow_logs.
prepare_script() {
  local arg prepare=("-m" "perflow_jax.prepare_data" "--model=$MODEL" "--out=$DATA" "--tpu-pod" "$@")
  cat <<'EOF'
set -euo pipefail
if running; then echo "$(hostname): training is running; stop it first (launch/tpu_pod.sh stop)" >&2; exit 1; fi
mkdir -p "$logs"
log=$logs/prepare-$(date -u +%Y%m%dT%H%M%SZ).log
cd "$code"
export PYTHONUNBUFFERED=1
EOF
  printf '"$venv/bin/python"'
  for arg in "${prepare[@]}"; do printf ' %s' "$(remote_value "$arg")"; done
  printf ' 2>&1 | tee "$log"\n'
}

# One line per worker: "perflow-worker HOST STATE", STATE one of no-setup, running, done, stopped,
# failed RC, killed, idle.
status_script() {
  printf 'stopped_codes=%s\n' "$(remote_value "$STOPPED_CODES")"
  cat <<'EOF'
if [ ! -x "$venv/bin/python" ]; then state=no-setup
elif running; then state=running
elif [ -f "$logs/train.rc" ]; then
  rc=$(cat "$logs/train.rc")
  case " $stopped_codes " in
    *" $rc "*) state=stopped ;;
    *) if [ "$rc" = 0 ]; then state=done; else state="failed $rc"; fi ;;
  esac
elif [ -f "$logs/train.pgid" ]; then state=killed
else state=idle; fi
echo "perflow-worker $(hostname) $state"
EOF
}

stop_script() {
  printf 'wait_s=%s\n' "$(remote_value "$STOP_WAIT")"
  cat <<'EOF'
if ! running; then echo "$(hostname): not running"; exit 0; fi
kill -TERM "$(cat "$logs/train.pid")" 2>/dev/null || true
for _ in $(seq $((wait_s * 5))); do running || break; sleep 0.2; done
if running; then kill -KILL -- "-$(cat "$logs/train.pgid")"; echo "$(hostname): killed after $wait_s s"
else echo "$(hostname): stopped"; fi
EOF
}

logs_script() {
  printf 'lines=%s\n' "$(remote_value "$LOG_LINES")"
  cat <<'EOF'
if [ -f "$logs/train.log" ]; then tail -n "$lines" "$logs/train.log" | sed "s/^/$(hostname): /"
else echo "$(hostname): no training log yet"; fi
EOF
}

cmd_train() {
  check_overrides "$@"
  say "starting training on every worker of $TPU_NAME: $CONFIG, WORKDIR $WORKDIR"
  on_workers "$(start_script "$@")"
}

cmd_prepare() {
  check_prepare_args "$@"
  say "preparing the data on every worker of $TPU_NAME: MODEL $MODEL, DATA $DATA"
  on_workers "$(prepare_script "$@")"
}

cmd_stop() { on_workers "$(stop_script)"; }
cmd_logs() { on_workers "$(logs_script)"; }

# The status lines of the workers that answered.
worker_lines() { on_workers "$(status_script)" 2>/dev/null | grep '^perflow-worker ' || true; }

# Worker status lines (stdin) summed up: unknown (no answer), no-setup, running, done, refused (train
# exited with status 2: bad settings, another run's WORKDIR, a failed save or a non-finite loss, which a
# restart would repeat), stopped (every worker stopped by SIGTERM or Ctrl-C before the last step, with a
# checkpoint: resume), idle, or failed (anything else: a failure, a mixture).
summarize() {
  local states
  states=$(cut -d' ' -f3- | sort -u)
  if [[ -z $states ]]; then echo unknown
  elif grep -qx no-setup <<<"$states"; then echo no-setup
  elif [[ $states == running ]]; then echo running
  elif [[ $states == "done" ]]; then echo "done"
  elif grep -qx 'failed 2' <<<"$states"; then echo refused
  elif [[ $states == stopped ]]; then echo stopped
  elif [[ $states == idle ]]; then echo idle
  else echo failed; fi
}

cmd_status() {
  say "$(resource_label): $(resource_state)"
  if [[ $DRY_RUN == 1 ]]; then
    on_workers "$(status_script)"
    return
  fi
  local lines
  lines=$(worker_lines)
  printf '%s\n' "${lines:-no answer from the workers}"
  say "training: $(summarize <<<"$lines")"
}

# Delete what is left of a preempted TPU, create it again, set it up and start training.
recreate() {
  local state=$1
  shift
  if [[ $state != ABSENT ]]; then delete_resource || return; fi
  create_resource || return
  wait_ready || return
  cmd_setup || return
  cmd_train "$@"
}

# One step of watch; a failure (say, an ssh that timed out) is reported and retried at the next check.
attempt() { "$@" || say "that did not work ($*); trying again in $POLL_SECONDS s"; }

cmd_watch() {
  check_overrides "$@"
  if [[ $DRY_RUN == 1 ]]; then
    say "dry run: the commands watch runs when it finds the TPU preempted"
    recreate SUSPENDED "$@"
    return
  fi
  local restarts=0 state lines training
  while true; do
    state=$(resource_state)
    case $state in
      ACTIVE | READY)
        lines=$(worker_lines)
        training=$(summarize <<<"$lines")
        say "$(resource_label) $state, training $training"
        [[ $training == running ]] || printf '%s\n' "$lines" >&2
        case $training in
          running | unknown) ;;
          done)
            say "training has finished; WORKDIR: $WORKDIR"
            if [[ $DELETE_WHEN_DONE == 1 ]]; then delete_resource; else
              say "the TPU is still there (and billed): launch/tpu_pod.sh delete"
            fi
            return 0
            ;;
          refused)
            cmd_logs || true
            die "train refused the run (exit status 2: bad settings, another run's WORKDIR, a failed save or a \
non-finite loss; the logs above say which): fix it, then watch again"
            ;;
          no-setup) attempt cmd_setup ;;
          idle) attempt cmd_train "$@" ;;
          stopped)
            say "training was stopped before its last step (a preemption or launch/tpu_pod.sh stop): resuming"
            attempt cmd_train "$@"
            ;;
          failed)
            restarts=$((restarts + 1))
            cmd_logs || true
            ((restarts <= MAX_RESTARTS)) || die "training failed $restarts times without a preemption; the logs \
above say why (MAX_RESTARTS=$MAX_RESTARTS)"
            say "restart $restarts of $MAX_RESTARTS (preemptions not counted), from the newest checkpoint"
            attempt cmd_stop
            attempt cmd_train "$@"
            ;;
        esac
        ;;
      ABSENT | SUSPENDING | SUSPENDED | FAILED | PREEMPTED | TERMINATED)
        say "$(resource_label) is $state: creating it again; training resumes from the newest checkpoint"
        attempt recreate "$state" "$@"
        ;;
      *) say "$(resource_label): $state" ;;
    esac
    sleep "$POLL_SECONDS"
  done
}

main() {
  local args=() arg
  for arg in "$@"; do
    if [[ $arg == --dry-run ]]; then DRY_RUN=1; else args+=("$arg"); fi
  done
  set -- "${args[@]}"
  local command=${1:-help}
  shift || true
  case $command in help | -h | --help) ;; *) check_settings ;; esac
  case $command in
    create) cmd_create "$@" ;;
    setup) cmd_setup "$@" ;;
    prepare) cmd_prepare "$@" ;;
    train) cmd_train "$@" ;;
    watch) cmd_watch "$@" ;;
    status) cmd_status ;;
    logs) cmd_logs ;;
    stop) cmd_stop ;;
    delete) delete_resource ;;
    help | -h | --help) usage ;;
    *) die "unknown command '$command': see launch/tpu_pod.sh help" ;;
  esac
}

# Run unless sourced (the tests source this file to call summarize).
if [[ ${BASH_SOURCE[0]} == "$0" ]]; then main "$@"; fi
