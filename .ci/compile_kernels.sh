#!/usr/bin/env bash
# Compile-check the torch-free CUDA kernel headers (csrc/torch_free/*.cuh) with plain nvcc, on a
# machine without a GPU. For every header, a tiny translation unit includes it and explicitly
# instantiates its kernels and launchers for float, double, __half and __nv_bfloat16 (through the
# header's CDA2_INSTANTIATE_<STEM>(T) hook), then compiles it for sm_80 and sm_90 (machine code, so
# ptxas checks register and shared-memory use too). Half types are built with torch's
# -D__CUDA_NO_HALF_*__ flags, as a torch extension build would. Warnings are errors.
#
# Usage: bash .ci/compile_kernels.sh        (NVCC=/path/to/nvcc to choose the compiler)
#        CDA2_CHECK_GLUE=1 bash .ci/compile_kernels.sh   also compiles csrc/cuda/*.cu against the
#            installed torch's headers (needs only the CUDA runtime headers; slow, off by default).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NVCC="${NVCC:-}"
if [[ -z "$NVCC" ]]; then
  if command -v nvcc >/dev/null 2>&1; then
    NVCC="$(command -v nvcc)"
  elif [[ -x /usr/local/cuda/bin/nvcc ]]; then
    NVCC=/usr/local/cuda/bin/nvcc
  fi
fi
if [[ -z "$NVCC" ]]; then
  echo "compile_kernels: SKIPPED: nvcc not found (set NVCC=... or put it on PATH)"
  exit 0
fi

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

ARCHS=(-gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90)
FLAGS=(-std=c++17 -O3 -c --Werror all-warnings -Xcompiler -Wall
       -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
       -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__)

echo "compile_kernels: $("$NVCC" --version | tail -n 1) ; archs sm_80 sm_90"
shopt -s nullglob
headers=("$ROOT"/csrc/torch_free/*.cuh)
if (( ${#headers[@]} == 0 )); then
  echo "compile_kernels: FAILED: no csrc/torch_free/*.cuh found"
  exit 1
fi

fail=0
for h in "${headers[@]}"; do
  name="$(basename "$h")"
  stem="${name%.cuh}"
  hook="CDA2_INSTANTIATE_$(echo "$stem" | tr '[:lower:]' '[:upper:]')"
  tu="$TMP/check_${stem}.cu"
  cat >"$tu" <<CU
#include "$h"
#ifndef $hook
#error "$name must define the instantiation hook $hook(T)"
#endif
$hook(float)
$hook(double)
$hook(__half)
$hook(__nv_bfloat16)
CU
  start=$SECONDS
  if "$NVCC" "${FLAGS[@]}" "${ARCHS[@]}" -I"$ROOT/csrc/torch_free" "$tu" -o "$TMP/${stem}.o" >"$TMP/${stem}.log" 2>&1; then
    echo "compile_kernels: OK     csrc/torch_free/$name (float, double, half, bfloat16; sm_80, sm_90; $((SECONDS - start)) s)"
  else
    echo "compile_kernels: FAILED csrc/torch_free/$name"
    sed 's/^/    /' "$TMP/${stem}.log"
    fail=1
  fi
done

if [[ "${CDA2_CHECK_GLUE:-0}" == "1" ]]; then
  TORCH_INC="$(python3 -c 'import torch.utils.cpp_extension as c; print(" ".join(c.include_paths()))' 2>/dev/null || true)"
  if [[ -z "$TORCH_INC" ]]; then
    echo "compile_kernels: glue check SKIPPED: torch not importable"
  else
    inc=()
    for d in $TORCH_INC; do inc+=(-I"$d"); done
    # A CPU build of torch ships the c10/cuda headers but not the generated cuda_cmake_macros.h.
    # C++17 as in CMakeLists.txt (torch 2.13's headers then warn about C++20 bit-field
    # initialisers; warnings are not errors here, the glue is torch's code as much as ours).
    gl_flags=(-std=c++17 -c --expt-relaxed-constexpr -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE -DTORCH_EXTENSION_NAME=_C
              -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
              -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
              -gencode arch=compute_90,code=sm_90)
    for f in "$ROOT"/csrc/cuda/*.cu; do
      start=$SECONDS
      if "$NVCC" "${gl_flags[@]}" "${inc[@]}" "$f" -o "$TMP/glue_$(basename "$f").o" >"$TMP/glue.log" 2>&1; then
        echo "compile_kernels: OK     csrc/cuda/$(basename "$f") (glue vs torch headers; $((SECONDS - start)) s)"
      else
        echo "compile_kernels: FAILED csrc/cuda/$(basename "$f")"
        sed 's/^/    /' "$TMP/glue.log"
        fail=1
      fi
    done
  fi
fi

if (( fail )); then
  echo "compile_kernels: FAILED"
  exit 1
fi
echo "compile_kernels: all ${#headers[@]} kernel headers compile"
