#!/usr/bin/env bash
# The prepared GPU speed check: build, then measure where a training step's time goes,
# in ONE device call of at most ~6.5 minutes (the device budget is 15 minutes in all: a rerun fits).
#
#   bash benchmarks/gpu_speed.sh          # on the lent GPU: run(command=..., timeout_s=450)
#   bash benchmarks/gpu_speed.sh          # here, without a GPU: the same parts at tiny sizes
#
# It is benchmarks/gpu_check.sh (its driver: each step under its own timeout, a global deadline,
# a failed step not stopping the next, at most 8 files back) with these steps:
#   build              pip install --no-build-isolation --no-deps . (gpu_check's build step)
#   speed_syncdebug    a whole step of every phase under set_sync_debug_mode("error")
#   speed_profile      torch.profiler per phase: top kernels, GPU idle time, synchronising calls
#   tests              python_tests/test_sync_free.py (-k cuda on a GPU): no sync, CUDA graphs
#   speed_paths        loop/packed, fp32/bf16, CUDA graphs on/off, sync-free vs host-reading attack
#                      backward, plain; M=3, B=128 and 512, ResNet-20, PGD-10, CUDA events
#   speed_concurrency  1, 2, 4, 8 training processes at once: aggregate img/s
#   speed_report       gpu_speed_<gpu>.json (write_results) and .md, into $OUT and, on a GPU,
#                      benchmarks/results/ (runs even after the deadline: it only folds the parts)
# (benchmarks/gpu_speed.py has the parts; `python benchmarks/gpu_speed.py --help`.)
#
# What comes back in $OUT: gpu_check.log (everything printed), summary.txt, gpu_speed_<gpu>.json
# and .md, and step_logs.tar.gz (each step's log).
#
# Knobs: those of gpu_check.sh (OUT, PYTHON, GPU_CHECK_SKIP_BUILD=1, GPU_CHECK_T_<STEP>,
# GPU_SPEED_ARGS, ...); GPU_CHECK_STEPS and GPU_CHECK_DEADLINE_S default to the above and 390 s.
# Without a GPU every time limit is 4x (a shared CPU is slow, and no device time is at stake).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
scale=1
"${PYTHON:-python3}" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null || scale=4
declare -A T=([build]=200 [speed_syncdebug]=60 [speed_profile]=60 [tests]=60 [speed_paths]=150
              [speed_concurrency]=160 [speed_report]=20)
for step in "${!T[@]}"; do
  var="GPU_CHECK_T_${step^^}"
  export "$var=${!var:-$(( T[$step] * scale ))}"
done
export GPU_CHECK_STEPS="${GPU_CHECK_STEPS:-build speed_syncdebug speed_profile tests speed_paths speed_concurrency speed_report}"
export GPU_CHECK_DEADLINE_S="${GPU_CHECK_DEADLINE_S:-$(( 390 * scale ))}"
export GPU_CHECK_TEST_PATHS="${GPU_CHECK_TEST_PATHS:-python_tests/test_sync_free.py}"
exec bash "$ROOT/benchmarks/gpu_check.sh"
