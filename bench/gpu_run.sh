#!/usr/bin/env bash
# The one GPU run of bench/: the PeRFlow training step (this project's JAX step against the
# authors' PyTorch step, eager and torch.compile'd), then the SD1.5 UNet forward, in under 8
# minutes (BUDGET_S, default 470 s, machine start excluded). Run from the repository root on the
# device with .whl/ carried (diffusers, which the GPU image lacks; bench/README.md):
#
#   bash bench/gpu_run.sh              # all, in order: SD1.5 step (JAX, PyTorch), SDXL step (JAX,
#                                      # PyTorch), UNet forward; what the budget leaves out is
#                                      # reported as skipped
#   bash bench/gpu_run.sh sdxl         # only the SDXL step, then the UNet forward (a second run)
#   bash bench/gpu_run.sh sd15|unet    # only the SD1.5 step / only the UNet forward
#   bash bench/gpu_run.sh sample       # only bench/sample.py: 4-step SD1.5 sampling, JAX vs diffusers
#   bash bench/gpu_run.sh --tiny       # the same path with tiny networks on a CPU (a check of the script)
#
# PYTHON names the interpreter (default python3, the image's; here: PYTHON=.venv/bin/python).
# Every part runs under its own time limit and writes its JSON as it goes, so a cut part still
# reports what it measured and where its time went. Results: $OUT/train_step.json (and one
# train_step.PART.json per part), $OUT/unet_forward.json, the logs beside them, and a summary
# at the end of the output. Exit status 1 if anything failed or was cut.
set -u -o pipefail
cd "$(dirname "$0")/.."

what=all
tiny=()
for arg in "$@"; do
  case "$arg" in
    all | sd15 | sdxl | unet | sample) what=$arg ;;
    --tiny) tiny=(--tiny) ;;
    *) echo "usage: bash bench/gpu_run.sh [all|sd15|sdxl|unet|sample] [--tiny]" >&2; exit 2 ;;
  esac
done
export OUT=${OUT:-/tmp/bench_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
budget=${BUDGET_S:-470}
start=$SECONDS
left() { echo $((budget - (SECONDS - start))); }
status=0

# Part time limits (s), sized from the design notes' anchors: JAX SD1.5 = 4 compilations
# (step at 32 and 16, the two halves) of about 40-60 s, lowering overlapped; PyTorch SD1.5 =
# eager steps and halves (~60 s) + torch.compile's 163 s; SDXL one compilation each side.
case "$what" in
  all) parts=jax-sd15,torch-sd15,jax-sdxl,torch-sdxl ;;
  sd15) parts=jax-sd15,torch-sd15 ;;
  sdxl) parts=jax-sdxl,torch-sdxl ;;
  unet | sample) parts= ;;
esac
timeouts=jax-sd15=200,torch-sd15=250,jax-sdxl=240,torch-sdxl=150

echo "== bench/gpu_run.sh $what ${tiny[*]}: budget ${budget} s, results in $OUT"
if ! "$python" -c "import diffusers" 2>/dev/null; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl ||
    { echo "cannot install diffusers from .whl/ (carry it: bench/README.md)" >&2; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$OUT/gpu.txt"
"$python" -c "import jax, torch, diffusers; print('jax', jax.__version__, jax.devices(), '| torch', torch.__version__, '| diffusers', diffusers.__version__)" \
  > "$OUT/versions.txt" || { echo "$python lacks jax, torch or diffusers" >&2; exit 1; }
cat "$OUT/versions.txt"

if [ -n "$parts" ]; then
  # Leave the UNet forward about 100 s when it is to run after the step.
  reserve=$([ "$what" = all ] || [ "$what" = sdxl ] && echo 100 || echo 0)
  deadline=$(($(left) - reserve))
  echo "== train_step: $parts (deadline ${deadline} s)"
  timeout -k 10 $((deadline + 30)) "$python" bench/train_step.py --parts "$parts" --timeouts "$timeouts" \
    --deadline "$deadline" "${tiny[@]}" 2>&1 | tee "$OUT/train_step.log"
  rc=${PIPESTATUS[0]}
  [ "$rc" -ne 0 ] && { echo "== train_step: exit status $rc"; status=1; }
fi

if [ "$what" = sample ]; then
  echo "== sample (time limit $(left) s)"
  timeout -k 10 "$(left)" "$python" bench/sample.py "${tiny[@]}" 2>&1 | tee "$OUT/sample.log"
  rc=${PIPESTATUS[0]}
  [ "$rc" -ne 0 ] && { echo "== sample: exit status $rc"; status=1; }
fi

if [ "$what" != sd15 ] && [ "$what" != sample ]; then
  limit=$(left)
  if [ "$limit" -ge 60 ]; then
    echo "== unet_forward (time limit ${limit} s)"
    timeout -k 10 "$limit" "$python" bench/unet_forward.py "${tiny[@]}" 2>&1 | tee "$OUT/unet_forward.log"
    rc=${PIPESTATUS[0]}
    [ "$rc" -eq 124 ] && echo "== unet_forward: cut by its time limit"
    [ "$rc" -ne 0 ] && { echo "== unet_forward: exit status $rc"; status=1; }
  else
    echo "== unet_forward: skipped, ${limit} s left of ${budget}"
  fi
fi

echo
echo "== summary ($((SECONDS - start)) s of ${budget})"
cat "$OUT/gpu.txt" "$OUT/versions.txt" 2>/dev/null
[ -f "$OUT/train_step.json" ] && [ -n "$parts" ] && "$python" bench/train_step.py --report "$OUT/train_step.json"
[ -f "$OUT/unet_forward.log" ] && [ "$what" != sd15 ] && [ "$what" != sample ] && tail -n 12 "$OUT/unet_forward.log"
[ -f "$OUT/sample.log" ] && [ "$what" = sample ] && tail -n 6 "$OUT/sample.log"
ls -l "$OUT"
exit $status
