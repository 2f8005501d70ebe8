#!/usr/bin/env bash
# The prepared GPU check: build, verify, sanitize and time the CUDA kernels, time the
# training step, and run a short real training, in ONE call on a lent GPU machine (about 6 min).
#
#   bash benchmarks/gpu_check.sh             # from anywhere; it works in the repository root
#
# Steps (each with its own timeout; a failed step does not stop the later ones):
#   build        pip install --no-build-isolation --no-deps . (CMAKE_BUILD_PARALLEL_LEVEL=nproc),
#                then the build line (cda2_ext.BUILD_INFO) and the GPU code embedded (cuobjdump)
#   registration benchmarks/check_registration.py: a CPU and a CUDA kernel for every op in csrc/ops.cpp
#   tests        CDA2_REQUIRE_EXTENSION=1 CDA2_REQUIRE_CUDA=1 pytest -q python_tests -k cuda
#   memcheck     compute-sanitizer --tool memcheck on benchmarks/sanitize_ops.py
#   ops_cuda     benchmarks/ops_cuda.py -> benchmarks/results/ops_cuda_<gpu>.json
#   train_step   benchmarks/train_step.py (if present) -> benchmarks/results/train_step_<gpu>.json
#   train        cda2 train (ResNet-20, M=3, 2 epochs) on CIFAR; loss must fall; reload on the CPU
#   racecheck    compute-sanitizer --tool racecheck on sanitize_ops.py --quick (last: least needed)
# and, named in GPU_CHECK_STEPS only (benchmarks/gpu_speed.sh does), the parts of
# benchmarks/gpu_speed.py: speed_syncdebug, speed_profile, speed_paths, speed_concurrency and
# speed_report (gpu_speed_<gpu>.json/.md into $OUT and, on a GPU, benchmarks/results/).
# Without CUDA it says so in one line and runs what means something on a CPU: the build, the
# registration check (CPU), the tests minus CUDA, the sanitizer workload and ops_cuda.py as smoke
# tests of those scripts (no sanitizer, no timings), and a tiny training run + CPU reload.
#
# Everything printed also goes to $OUT/gpu_check.log, each step's output to $OUT/<step>.log; at
# the end (the device returns at most 8 files) the step logs are packed into
# $OUT/step_logs.tar.gz and the training run folder into $OUT/train_run.tar.gz, next to
# summary.txt and the result JSONs. $OUT defaults to ./gpu_out.
#
# Environment knobs (all optional):
#   OUT                    where logs and results go (default: <repo>/gpu_out)
#   PYTHON                 interpreter (default: python3)
#   GPU_CHECK_STEPS        the steps to run, e.g. "tests ops_cuda" (default: all, in the order above)
#   GPU_CHECK_SKIP_BUILD=1 use the cda2_ext already installed (e.g. an editable install) instead of
#                          pip-installing this tree over it
#   GPU_CHECK_DEADLINE_S   no step starts after this many seconds, and each step's timeout is cut to
#                          end by then (default 440: with the call's timeout_s=500 the script always
#                          returns its logs)
#   GPU_CHECK_T_<STEP>     a step's own timeout in seconds (e.g. GPU_CHECK_T_OPS_CUDA=150)
#   GPU_CHECK_TEST_WORKERS pytest-xdist workers for the CUDA tests where xdist is installed (default 4; 0: none)
#   CDA2_DATA              CIFAR-10 folder (default: .device/data, then ../shared/data; else synthetic data)
#   GPU_CHECK_TRAIN_ARGS   replaces the training run's size flags (depth, models, epochs, limits)
#   TRAIN_STEP_ARGS        arguments for train_step.py (default: --device cuda --models 3 --batch 128 512,
#                          those of them it has; --quick where it has no --models/--batch)
#   GPU_CHECK_TEST_PATHS   what pytest collects (default: python_tests)
#   OPS_CUDA_ARGS          extra arguments for ops_cuda.py (e.g. "--dtypes float32 bfloat16")
#   GPU_CHECK_KEEP_FILES=1 leave the step logs and run folder unpacked under $OUT
#   GPU_SPEED_ARGS         extra arguments for every gpu_speed.py part (e.g. "--batch 128")
set -uo pipefail  # no -e: every step runs, and the summary says which failed

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
OUT="${OUT:-$ROOT/gpu_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python3}"
DEADLINE="${GPU_CHECK_DEADLINE_S:-440}"
STEPS="${GPU_CHECK_STEPS:-build registration tests memcheck ops_cuda train_step train racecheck}"
export PYTHONUNBUFFERED=1 ROOT OUT PY
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
export WORK

exec > >(tee -a "$OUT/gpu_check.log") 2>&1
TEE_PID=$!

# ---- the machine -------------------------------------------------------------------------------
HAVE_CUDA="$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)"
export HAVE_CUDA
echo "gpu_check: $(date -u +%FT%TZ) in $ROOT, OUT=$OUT, deadline ${DEADLINE}s, steps: $STEPS"
echo "gpu_check: $("$PY" -c 'import sys, torch; print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda})")' 2>&1)"
if [[ "$HAVE_CUDA" == 1 ]]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader 2>/dev/null \
    | sed 's/^/gpu_check: GPU: /'
  echo "gpu_check: nvcc: $(nvcc --version 2>/dev/null | tail -n 1); $(nproc) CPU cores"
else
  echo "gpu_check: NO CUDA device visible to torch: running the CPU-meaningful steps only (build, CPU registration, tests minus CUDA, smoke runs, a tiny training run)"
fi

# CIFAR-10: the subset carried in .device/data on the GPU machine, ../shared/data here.
DATA="${CDA2_DATA:-}"
if [[ -z "$DATA" ]]; then
  for d in "$ROOT/.device/data" "$ROOT/../shared/data"; do
    if [[ -f "$d/cifar-10-batches-py/data_batch_1" ]]; then DATA="$(cd "$d" && pwd)"; break; fi
  done
fi
export DATA
[[ -n "$DATA" ]] && export CDA2_DATA="$DATA"

# ---- the steps ---------------------------------------------------------------------------------
# Each runs as `bash -c step_<name>` under `timeout`, so it can be killed as a whole. Exit codes:
# 0 PASS, 3 SKIP (not applicable here), 4 REFUSED (the tool refused this device), 7 sanitizer
# errors, 124/137 TIMEOUT, anything else FAIL.

cda2_cli() {  # the installed console script, or the module where the script is not on PATH
  if command -v cda2 >/dev/null 2>&1; then cda2 "$@"; else "$PY" -m cda2_ext.cli "$@"; fi
}

step_build() {
  if [[ "${GPU_CHECK_SKIP_BUILD:-0}" == 1 ]]; then
    echo "build: skipped (GPU_CHECK_SKIP_BUILD=1): using the cda2_ext already installed"
  else
    export CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)"
    echo "build: $PY -m pip install --no-build-isolation --no-deps -v . (CMAKE_BUILD_PARALLEL_LEVEL=$CMAKE_BUILD_PARALLEL_LEVEL)"
    "$PY" -m pip install --no-build-isolation --no-deps -v . || return 1
    # From the repository root `import cda2_ext` finds this source tree first, which has no _C of
    # its own after a (non-editable) install: put the built one beside it, unless the tree already
    # imports one (an editable install).
    if [[ "$(cd "$ROOT" && "$PY" -c 'import warnings; warnings.simplefilter("ignore"); import cda2_ext; print(int(cda2_ext.HAS_EXTENSION))')" != 1 ]]; then
      so="$(cd "$WORK" && "$PY" -c 'import cda2_ext._C as m; print(m.__file__)')" || return 1
      cp -f "$so" "$ROOT/cda2_ext/" && echo "build: copied $so into $ROOT/cda2_ext/ (so the source tree imports it too)"
    fi
  fi
  echo "BUILD LINE: $("$PY" -c 'import cda2_ext; print(cda2_ext.BUILD_INFO)')"
  so="$("$PY" -c 'import cda2_ext._C as m; print(m.__file__)')" || return 1
  echo "build: extension $so ($(du -h "$so" | cut -f1))"
  local cuobjdump
  cuobjdump="$(command -v cuobjdump || ls /usr/local/cuda/bin/cuobjdump /usr/local/cuda*/bin/cuobjdump 2>/dev/null | head -n 1)"
  if [[ -n "$cuobjdump" ]]; then  # count of kernels' code per architecture: expect sm_90a, sm_90, PTX sm_80
    echo "build: machine code embedded: $("$cuobjdump" --list-elf "$so" 2>/dev/null | grep -o 'sm_[0-9]*[a-z]*' | sort | uniq -c | tr -s ' ' | tr '\n' ';')"
    echo "build: PTX embedded: $("$cuobjdump" --list-ptx "$so" 2>/dev/null | grep -o 'sm_[0-9]*[a-z]*' | sort | uniq -c | tr -s ' ' | tr '\n' ';')"
  elif [[ "$HAVE_CUDA" == 1 ]]; then
    echo "build: cuobjdump not found: embedded architectures not listed"
  fi
}

step_registration() {
  "$PY" benchmarks/check_registration.py
}

step_tests() {
  if [[ "$HAVE_CUDA" == 1 ]]; then
    local extra=()
    if "$PY" -c 'import xdist' 2>/dev/null && [[ "${GPU_CHECK_TEST_WORKERS:-4}" != 0 ]]; then
      extra+=(-n "${GPU_CHECK_TEST_WORKERS:-4}")
    fi
    if "$PY" -c 'import pytest_timeout' 2>/dev/null; then extra+=(--timeout 120); fi
    echo "tests: CDA2_REQUIRE_EXTENSION=1 CDA2_REQUIRE_CUDA=1 pytest -q ${GPU_CHECK_TEST_PATHS:-python_tests} -k cuda ${extra[*]}"
    # shellcheck disable=SC2086
    CDA2_REQUIRE_EXTENSION=1 CDA2_REQUIRE_CUDA=1 "$PY" -m pytest -q -p no:cacheprovider ${GPU_CHECK_TEST_PATHS:-python_tests} -k cuda "${extra[@]}"
  else
    echo "tests: no GPU: CDA2_REQUIRE_EXTENSION=1 pytest -q ${GPU_CHECK_TEST_PATHS:-python_tests} -k 'not cuda'"
    # shellcheck disable=SC2086
    CDA2_REQUIRE_EXTENSION=1 "$PY" -m pytest -q -p no:cacheprovider ${GPU_CHECK_TEST_PATHS:-python_tests} -k "not cuda"
  fi
}

find_sanitizer() {
  command -v compute-sanitizer 2>/dev/null && return 0
  ls /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda*/bin/compute-sanitizer \
     /usr/local/cuda*/compute-sanitizer/compute-sanitizer /opt/nvidia/*/compute-sanitizer 2>/dev/null | head -n 1
}

# sanitize TOOL ARGS...: run sanitize_ops.py (with ARGS) under compute-sanitizer --tool TOOL.
sanitize() {
  local tool="$1"; shift
  if [[ "$HAVE_CUDA" != 1 ]]; then
    if [[ "$tool" != memcheck ]]; then echo "$tool: no GPU: skipped"; return 3; fi
    echo "$tool: no GPU: the sanitizer workload on the CPU kernels, no sanitizer (a smoke test of sanitize_ops.py)"
    "$PY" benchmarks/sanitize_ops.py --device cpu --quick
    return
  fi
  local san; san="$(find_sanitizer)"
  if [[ -z "$san" ]]; then echo "$tool: compute-sanitizer not found: skipped"; return 3; fi
  local log="$WORK/$tool.out"
  echo "$tool: PYTORCH_NO_CUDA_MEMORY_CACHING=1 $san --tool $tool ... $PY benchmarks/sanitize_ops.py $*"
  # No caching allocator: every tensor its own cudaMalloc, so an access past its end is caught.
  # --report-api-errors no: torch probes some CUDA APIs expecting errors; our own launch errors
  # raise in the glue (C10_CUDA_KERNEL_LAUNCH_CHECK) and fail the script instead.
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$san" --tool "$tool" --error-exitcode 7 --report-api-errors no \
    --print-limit 20 "$PY" benchmarks/sanitize_ops.py "$@" 2>&1 | tee "$log"
  local rc=${PIPESTATUS[0]}
  if grep -qiE 'device not supported|not supported on this (device|platform)|unable to (initialize|create)|failed to (initialize|load)' "$log" \
     && ! grep -q 'sanitize_ops: OK' "$log"; then
    echo "$tool: REFUSED: compute-sanitizer could not run on this device ($(grep -iE -m1 'not supported|unable to|failed to' "$log"))"
    return 4
  fi
  grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$log" | sed "s/^/$tool: /"
  return "$rc"
}
step_memcheck() { sanitize memcheck; }
step_racecheck() { sanitize racecheck --quick; }

# copy_new_results NAME: the benchmarks/results/NAME_*.json this step wrote (not the committed CPU
# ones: the device returns at most 8 files, and a run here lost its GPU JSON to those).
copy_new_results() {
  find benchmarks/results -maxdepth 1 -name "$1_*.json" -newer "$WORK/step_started" \
    -exec cp -f {} "$OUT/" \;
}

step_ops_cuda() {
  local t="$1"
  if [[ "$HAVE_CUDA" != 1 ]]; then
    echo "ops_cuda: no GPU: a smoke test of ops_cuda.py on the CPU kernels (no timings worth reading)"
    "$PY" benchmarks/ops_cuda.py --device cpu --shapes paper --runs 3 --warmup 1 --no-compile \
      --out "$WORK/ops_cuda_smoke_cpu.json"
    return
  fi
  # --budget-s: start no new case once the step's time is nearly spent; the JSON is rewritten
  # after every case, so what was measured is kept either way.
  # shellcheck disable=SC2086
  "$PY" benchmarks/ops_cuda.py --runs 100 --warmup 10 --budget-s $(( t > 60 ? t - 40 : 20 )) ${OPS_CUDA_ARGS:-}
  local rc=$?
  copy_new_results ops_cuda
  return $rc
}

step_train_step() {
  if [[ ! -f benchmarks/train_step.py ]]; then
    echo "train_step: benchmarks/train_step.py does not exist (yet): skipped"; return 3
  fi
  if [[ "$HAVE_CUDA" != 1 ]]; then echo "train_step: no GPU: skipped (it times the CUDA training step)"; return 3; fi
  local args
  if [[ -n "${TRAIN_STEP_ARGS+x}" ]]; then
    args="$TRAIN_STEP_ARGS"
  else  # pass the flags it has that put it on the GPU and keep it to about 1.5 min
    local help; help="$("$PY" benchmarks/train_step.py --help 2>&1)"
    args=""
    grep -q -- '--device' <<<"$help" && args+=" --device cuda"
    if grep -q -- '--models' <<<"$help" && grep -q -- '--batch' <<<"$help"; then
      args+=" --models 3 --batch 128 512"  # the paper's M=3 at two batch sizes, all phases and paths
    elif grep -q -- '--quick' <<<"$help"; then
      args+=" --quick"
    fi
  fi
  echo "train_step: $PY benchmarks/train_step.py$args"
  # shellcheck disable=SC2086
  "$PY" benchmarks/train_step.py $args
  local rc=$?
  copy_new_results train_step
  return $rc
}

step_train() {
  local run="$OUT/train_run" size dev data_args
  rm -rf "$run"
  if [[ "$HAVE_CUDA" == 1 ]]; then
    size="${GPU_CHECK_TRAIN_ARGS:---depth 20 --num-models 3 --epochs 2}"; dev=cuda
  else  # a tiny run: 2 cores
    size="${GPU_CHECK_TRAIN_ARGS:---depth 8 --num-models 2 --epochs 2 --train-limit 256 --test-limit 100 --steps 2}"; dev=cpu
  fi
  if [[ -n "$DATA" ]]; then
    data_args="--data $DATA"
  else
    echo "train: no CIFAR-10 folder found (CDA2_DATA, .device/data, ../shared/data): synthetic data"
    data_args="--dataset synthetic"
  fi
  echo "train: cda2 train $size $data_args --device $dev --seed 0 --out-dir $run --no-progress"
  # shellcheck disable=SC2086
  cda2_cli train $size $data_args --device $dev --seed 0 --out-dir "$run" --no-progress || return 1
  "$PY" - "$run/metrics.json" <<'EOF' || return 1
import json, sys
hist = json.load(open(sys.argv[1]))
for m in hist:
    test = m.get("test") or {}
    print(f"train: epoch {m['epoch']}: loss {m['loss']:.4f} (surrogate {m['surrogate']:.4f}, bce {m['bce']:.4f}), "
          f"clean {m['clean_acc']:.3f}, adv {m['adv_acc']}, test collab {test.get('collaboration')}, "
          f"{m['images_per_s']:.0f} img/s, {m['seconds']:.1f} s")
losses = [m["loss"] for m in hist]
ok = len(losses) >= 2 and losses[-1] < losses[0]
print(f"train: loss {'FALLS' if ok else 'DOES NOT FALL'}: {losses[0]:.4f} -> {losses[-1]:.4f}")
sys.exit(0 if ok else 1)
EOF
  echo "train: reload on the CPU: cda2 eval-clean $run --device cpu --limit 500"
  cda2_cli eval-clean "$run" --device cpu --limit 500 --out "$run/eval_clean_cpu.json" || return 1
}

# The parts of benchmarks/gpu_speed.py: on a GPU at full size into benchmarks/results/,
# without one at tiny sizes into $WORK only (a test of the script); the report also into $OUT.
speed_part() {
  local dev=cpu results="$WORK" quick=--quick
  [[ "$HAVE_CUDA" == 1 ]] && dev=cuda results="$ROOT/benchmarks/results" quick=
  # shellcheck disable=SC2086
  "$PY" benchmarks/gpu_speed.py "$@" --device "$dev" $quick --parts "$WORK/speed_parts" \
    --results-dir "$results" --out-dir "$OUT" ${GPU_SPEED_ARGS:-}
}
step_speed_syncdebug() { speed_part syncdebug; }
step_speed_profile() { speed_part profile; }
step_speed_paths() { speed_part paths; }
step_speed_concurrency() {  # per level (1, 2, 4, 8 processes; quick: 1, 2): start up, then train
  local duration=10 levels=4 settle
  [[ "$HAVE_CUDA" == 1 ]] || { duration=2; levels=2; }
  settle=$(( $1 / levels - duration - 5 ))
  (( settle < 10 )) && settle=10
  speed_part concurrency --duration "$duration" --settle "$settle"
}
step_speed_report() { speed_part report; }

export -f copy_new_results cda2_cli step_build step_registration step_tests find_sanitizer sanitize step_memcheck \
  step_racecheck step_ops_cuda step_train_step step_train speed_part step_speed_syncdebug step_speed_profile \
  step_speed_paths step_speed_concurrency step_speed_report

# ---- the driver --------------------------------------------------------------------------------
declare -A DEFAULT_T=([build]=200 [registration]=30 [tests]=120 [memcheck]=90 [ops_cuda]=140
                      [train_step]=120 [train]=100 [racecheck]=60 [speed_syncdebug]=60
                      [speed_profile]=60 [speed_paths]=150 [speed_concurrency]=160 [speed_report]=20)
# Steps that still run, for up to their own timeout, once the deadline is reached (they fold what
# the others measured: cheap, and without them the call returns nothing readable).
AFTER_DEADLINE=" speed_report "
NAMES=() STATUS=() SECS=()
FAILED=0

run_step() {
  local name="$1" var t left t0 rc st
  var="GPU_CHECK_T_${name^^}"
  t="${!var:-${DEFAULT_T[$name]}}"
  left=$(( DEADLINE - SECONDS ))
  [[ "$AFTER_DEADLINE" == *" $name "* ]] && left=$(( left > 0 ? left + t : t ))
  NAMES+=("$name")
  if (( left < 15 )); then
    echo; echo "===== [$name] not started: the ${DEADLINE}s deadline is reached ====="
    STATUS+=("SKIP (deadline)"); SECS+=(0); return
  fi
  (( t > left )) && t=$left
  echo; echo "===== [$name] timeout ${t}s, $(date -u +%T) ====="
  t0=$SECONDS
  touch "$WORK/step_started"
  timeout -k 10 "$t" bash -c "step_$name $t" 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  case "$rc" in
    0) st=PASS ;;
    3) st=SKIP ;;
    4) st=REFUSED ;;
    7) st="FAIL (sanitizer errors)"; FAILED=$((FAILED + 1)) ;;
    124|137) st="TIMEOUT (${t}s)"; FAILED=$((FAILED + 1)) ;;
    *) st="FAIL (rc $rc)"; FAILED=$((FAILED + 1)) ;;
  esac
  STATUS+=("$st"); SECS+=($((SECONDS - t0)))
  echo "===== [$name] $st in $((SECONDS - t0))s ====="
}

pack() {  # the device returns at most 8 files: fold the step logs and the run folder into two
  [[ "${GPU_CHECK_KEEP_FILES:-0}" == 1 ]] && return
  local logs=()
  for n in "${NAMES[@]}"; do [[ -f "$OUT/$n.log" ]] && logs+=("$n.log"); done
  if (( ${#logs[@]} )); then
    tar -czf "$OUT/step_logs.tar.gz" -C "$OUT" "${logs[@]}" && (cd "$OUT" && rm -f "${logs[@]}")
  fi
  if [[ -d "$OUT/train_run" ]]; then
    tar -czf "$OUT/train_run.tar.gz" -C "$OUT" train_run && rm -rf "$OUT/train_run"
  fi
}

for name in $STEPS; do
  if [[ -z "${DEFAULT_T[$name]+x}" ]]; then echo "gpu_check: unknown step '$name' (known: ${!DEFAULT_T[*]})"; continue; fi
  run_step "$name"
done

{
  echo
  echo "===== gpu_check summary ($([[ "$HAVE_CUDA" == 1 ]] && echo "GPU" || echo "NO GPU: CPU path"), ${SECONDS}s total) ====="
  printf '%-17s %-26s %6s\n' step status seconds
  for i in "${!NAMES[@]}"; do printf '%-17s %-26s %6s\n' "${NAMES[$i]}" "${STATUS[$i]}" "${SECS[$i]}"; done
  echo "failed steps: $FAILED"
} | tee "$OUT/summary.txt"
pack
rm -rf "$WORK"
echo "gpu_check: files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
exec >&- 2>&-
wait "$TEE_PID" 2>/dev/null  # let tee finish gpu_check.log before the device collects $OUT
exit $(( FAILED > 0 ))
