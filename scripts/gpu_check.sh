#!/usr/bin/env bash
# Every GPU check of issue 26 in one run, for a machine with an NVIDIA GPU (the device tool's machines).
#
#   scripts/gpu_check.sh [OUT_DIR]          OUT_DIR: logs and results (default $OUT, else build/gpu_check)
#
# Environment: PYTHON (default python3: numpy, onnx, pytest; onnxruntime-gpu for the ORT steps),
# ONNXRUNTIME_INCLUDE_DIR (else build/ort_headers/include or build/*/ort_headers/include: the machine has
# no network to fetch them), GPU_MODELS (folder of .onnx files timed whole, default build/gpu_models),
# CUDA_ARCHS (default: the CMake default set), GPU_CHECK_DRY_RUN=1 (run on a machine without a GPU: every
# GPU step must then FAIL, which shows the script cannot pass silently).
#
# Steps, each logged to OUT_DIR/<step>.log, a summary table at the end:
#   gpu           nvidia-smi sees a GPU; else exit 2 at once (nothing else can run)
#   build         runtime_ops/ (default architectures) + normact_cuda_check into build/gpu, zero warnings
#   wrong-arch    libnormact_cuda.so for an architecture this GPU cannot run (build/gpu-wrongarch)
#   check         normact_cuda_check: every launcher against the CPU loops (offsets, in-place, looping grid)
#   memcheck      compute-sanitizer --tool memcheck normact_cuda_check --quick
#   bandwidth     normact_cuda_check --bench: GB/s at 64M elements against a device-to-device copy
#   --- the steps below need onnxruntime with the CUDA execution provider (onnxruntime-gpu) in PYTHON:
#   pytest        tests/test_kernels_gpu.py (incl. the wrong-architecture error) + tests/test_cuda_build.py
#   memcheck-ort  compute-sanitizer on the GPU tests (the short cases)
#   bench         benchmarks/bench_cuda.py: kernels at 64M vs ORT's op and a copy; whole models
#                 (GPU_MODELS/*.onnx and a MiniLM-shaped BERT when torch + transformers are there)
# Exit: 0 every step passed; 1 a step failed; 2 no GPU; 3 none failed but some were skipped (listed).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${1:-${OUT:-build/gpu_check}}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
BUILD=build/gpu
WRONG=build/gpu-wrongarch
declare -a NAMES RESULTS
start=$SECONDS

record() { NAMES+=("$1"); RESULTS+=("$2"); printf '%-13s %s\n' "$1" "$2"; }

# step NAME TIMEOUT_S CMD...: runs CMD with its output in OUT/NAME.log; PASS on exit 0.
step() {
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS rc
  if declare -F "$1" >/dev/null; then  # a function of this script (the builds): no timeout(1) for those
    "$@" >"$OUT/$name.log" 2>&1
  else
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  fi
  rc=$?
  if [ $rc -eq 0 ]; then
    record "$name" "PASS ($((SECONDS - t0)) s)"
  else
    [ $rc -eq 124 ] && echo "(timed out after $limit s)" >>"$OUT/$name.log"
    record "$name" "FAIL rc=$rc ($((SECONDS - t0)) s): $(tail -n 3 "$OUT/$name.log" | tr '\n' ' ' | cut -c1-300)"
  fi
  return $rc
}

skip() { record "$1" "SKIP: $2"; }

# ---------------------------------------------------------------- the GPU
if nvidia-smi -L >"$OUT/gpu.log" 2>&1 && grep -q "^GPU " "$OUT/gpu.log"; then
  nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv >>"$OUT/gpu.log" 2>&1
  record gpu "PASS: $(head -n 1 "$OUT/gpu.log")"
  CC=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1 | tr -d ' .')
elif [ "${GPU_CHECK_DRY_RUN:-0}" = 1 ]; then
  record gpu "FAIL (dry run continues): no GPU: $(tr '\n' ' ' <"$OUT/gpu.log" | cut -c1-200)"
  CC=""
else
  echo "gpu_check: no NVIDIA GPU here (nvidia-smi: $(tr '\n' ' ' <"$OUT/gpu.log" | cut -c1-200)); nothing was checked" >&2
  exit 2
fi

# ---------------------------------------------------------------- build
if [ -z "${ONNXRUNTIME_INCLUDE_DIR:-}" ]; then
  for d in build/ort_headers/include build/*/ort_headers/include; do
    if [ -f "$d/onnxruntime_c_api.h" ]; then
      export ONNXRUNTIME_INCLUDE_DIR="$ROOT/$d"
      break
    fi
  done
fi
if [ -z "${ONNXRUNTIME_INCLUDE_DIR:-}" ]; then
  echo "gpu_check: no ONNX Runtime headers (set ONNXRUNTIME_INCLUDE_DIR, or copy an include/ folder with" \
    "onnxruntime_c_api.h to build/ort_headers/include and carry build/ort_headers)" >"$OUT/build.log"
fi
archs=()
[ -n "${CUDA_ARCHS:-}" ] && archs=("-DCMAKE_CUDA_ARCHITECTURES=$CUDA_ARCHS")
jobs=$(nproc 2>/dev/null || echo 2)
build() {
  [ -n "${ONNXRUNTIME_INCLUDE_DIR:-}" ] || { cat "$OUT/build.log"; return 1; }
  cmake -S runtime_ops -B "$BUILD" -G Ninja -DNORMACT_CUDA_CHECK=ON "${archs[@]}" \
    -DONNXRUNTIME_INCLUDE_DIR="$ONNXRUNTIME_INCLUDE_DIR" -DCMAKE_CUDA_FLAGS=--threads=0 &&
    cmake --build "$BUILD" -j "$jobs" &&
    [ -f "$BUILD/libnormact_cuda.so" ] && [ -x "$BUILD/normact_cuda_check" ]
}
if step build 600 build; then
  if grep -i "warning" "$OUT/build.log" | grep -v "cublas_v2.h" >"$OUT/build-warnings.log"; then
    record build-warnings "FAIL: $(wc -l <"$OUT/build-warnings.log") warning lines (build-warnings.log)"
  else
    record build-warnings "PASS: none"
  fi
fi
# An architecture this GPU cannot run: sm_75 SASS only (sm_80 on a Turing GPU).
wrong=75-real
[ "${CC:-}" = 75 ] && wrong=80-real
wrong_build() {
  cmake -S runtime_ops -B "$WRONG" -G Ninja -DCMAKE_CUDA_ARCHITECTURES=$wrong \
    -DONNXRUNTIME_INCLUDE_DIR="${ONNXRUNTIME_INCLUDE_DIR:-}" && cmake --build "$WRONG" -j "$jobs" --target normact_cuda
}
if [ -n "${ONNXRUNTIME_INCLUDE_DIR:-}" ]; then step wrong-arch 400 wrong_build; else skip wrong-arch "no headers"; fi

# ---------------------------------------------------------------- kernels without ONNX Runtime
if [ -x "$BUILD/normact_cuda_check" ]; then
  step check 300 "$BUILD/normact_cuda_check"
  if command -v compute-sanitizer >/dev/null; then
    step memcheck 400 compute-sanitizer --tool memcheck --error-exitcode 1 --leak-check no \
      "$BUILD/normact_cuda_check" --quick
  else
    record memcheck "FAIL: compute-sanitizer not on PATH"
  fi
  step bandwidth 200 "$BUILD/normact_cuda_check" --bench
else
  for s in check memcheck bandwidth; do record $s "FAIL: not built"; done
fi

# ---------------------------------------------------------------- through ONNX Runtime's CUDA EP
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export NORMACT_LIBRARY_DIR="$ROOT/$BUILD"
[ -f "$WRONG/libnormact_cuda.so" ] && export NORMACT_CUDA_WRONG_ARCH_LIBRARY="$ROOT/$WRONG/libnormact_cuda.so"
has_cuda_ep=$("$PY" -c "import onnxruntime as o; print(int('CUDAExecutionProvider' in o.get_available_providers()))" \
  2>"$OUT/ort.log")
if [ "$has_cuda_ep" != 1 ]; then
  why="$PY has no onnxruntime with the CUDA EP ($("$PY" -c 'import onnxruntime as o; print("onnxruntime", o.__version__, o.get_available_providers())' 2>&1 | tail -n 1)); carry an onnxruntime-gpu wheel"
  for s in pytest memcheck-ort bench; do skip $s "$why"; done
else
  step pytest 500 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_kernels_gpu.py tests/test_cuda_build.py
  if grep -q "SKIPPED" "$OUT/pytest.log"; then
    record pytest-skips "FAIL: GPU tests skipped on a GPU machine: $(grep SKIPPED "$OUT/pytest.log" | head -n 3 | tr '\n' ' ')"
  fi
  if command -v compute-sanitizer >/dev/null; then
    step memcheck-ort 500 compute-sanitizer --tool memcheck --error-exitcode 1 --leak-check no \
      --target-processes all "$PY" -m pytest -q -x -p no:cacheprovider tests/test_kernels_gpu.py \
      -k "misaligned or inplace or graph or stream or nan_inf"
  fi
  models=()
  for m in "${GPU_MODELS:-build/gpu_models}"/*.onnx; do [ -f "$m" ] && models+=(--model "$m"); done
  bert=()
  "$PY" -c "import torch, transformers" 2>/dev/null && bert=(--export-bert "$OUT/bert_minilm_shape.onnx")
  step bench 500 "$PY" benchmarks/bench_cuda.py --json "$OUT/bench_cuda.json" "${models[@]}" "${bert[@]}"
fi

# ---------------------------------------------------------------- summary
echo
echo "gpu_check summary ($((SECONDS - start)) s; logs in $OUT):"
failed=0 skipped=0
for i in "${!NAMES[@]}"; do
  printf '  %-14s %s\n' "${NAMES[$i]}" "${RESULTS[$i]}"
  case ${RESULTS[$i]} in FAIL*) failed=1 ;; SKIP*) skipped=1 ;; esac
done
{
  echo "date: $(date -u +%F)"
  for i in "${!NAMES[@]}"; do echo "${NAMES[$i]}: ${RESULTS[$i]}"; done
} >"$OUT/summary.txt"
[ $failed = 1 ] && exit 1
[ $skipped = 1 ] && exit 3
exit 0
