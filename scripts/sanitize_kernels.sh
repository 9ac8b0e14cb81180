#!/usr/bin/env bash
# Build runtime_ops/ with AddressSanitizer + UndefinedBehaviorSanitizer and run the kernel tests against it.
#
#   scripts/sanitize_kernels.sh [PYTHON]     PYTHON: an environment with the test dependencies (default python3)
#
# The sanitized libnormact_cpu.so goes to build/sanitize (or $NORMACT_SANITIZE_BUILD_DIR), never into the
# package; the tests reach it through NORMACT_LIBRARY_DIR. ASan's runtime must be the process's first library,
# so Python starts with it in LD_PRELOAD. Any report aborts the run: UBSan errors are fatal
# (-fno-sanitize-recover, halt_on_error), leak checking is off (the Python interpreter keeps memory at exit by
# design). Tests: every fused Norm kernel (tests/test_kernels.py) and statistics kernel
# (tests/test_calibration_fused.py) through real ONNX Runtime sessions.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-python3}
BUILD=${NORMACT_SANITIZE_BUILD_DIR:-build/sanitize}
start=$SECONDS

# The ONNX Runtime headers: an explicit ONNXRUNTIME_INCLUDE_DIR, else those `pip install .` unpacked into its
# build tree (build/<wheel tag>/ort_headers), else CMake fetches them (fetch_ort_headers.sh).
if [ -z "${ONNXRUNTIME_INCLUDE_DIR:-}" ]; then
  for d in build/*/ort_headers/include; do
    if [ -f "$d/onnxruntime_c_api.h" ]; then
      export ONNXRUNTIME_INCLUDE_DIR="$PWD/$d"
      break
    fi
  done
fi
command -v cmake >/dev/null || { echo "sanitize_kernels: needs cmake (>= 3.18) on PATH" >&2; exit 1; }
generator=()
if [ ! -f "$BUILD/CMakeCache.txt" ] && command -v ninja >/dev/null; then generator=(-G Ninja); fi
# Debug: the C-API glue at -O0; the kernels are built at -O1 (CMakeLists.txt), all with -g for the reports.
cmake -S runtime_ops -B "$BUILD" "${generator[@]}" -DNORMACT_SANITIZE=ON -DCMAKE_BUILD_TYPE=Debug >/dev/null
cmake --build "$BUILD" -j"$(nproc)"
lib="$BUILD/libnormact_cpu.so"
if [[ "$(ldd "$lib")" != *libasan* ]]; then
  echo "sanitize_kernels: $lib is not linked with ASan" >&2
  exit 1
fi
cxx=$(cmake -N -LA "$BUILD" | sed -n 's/^CMAKE_CXX_COMPILER:[A-Z]*=//p')
asan=$("$cxx" -print-file-name=libasan.so)
# libstdc++ right after it: Python is not a C++ program, and ASan's __cxa_throw interceptor must find the real
# one when it starts (else the first C++ exception anywhere, e.g. inside onnxruntime, fails ASan's CHECK).
stdcxx=$("$cxx" -print-file-name=libstdc++.so)
for f in "$asan" "$stdcxx"; do
  if [ ! -f "$f" ]; then
    echo "sanitize_kernels: $cxx has no shared runtime $f" >&2
    exit 1
  fi
done
echo "sanitized library built in $((SECONDS - start))s"

export NORMACT_LIBRARY_DIR="$PWD/$BUILD"
"$PY" - "$lib" <<'PY'
import os, sys
from normact_onnx.runtime import get_library_path
want = os.path.realpath(sys.argv[1])
got = get_library_path()
if got != want:
    sys.exit(f"sanitize_kernels: the tests would load {got}, not {want}")
PY
# --capture=sys: pytest captures Python's output only, so a report written to the process's stderr by the
# sanitizers is shown even though the process ends there (fd capture would swallow it with the process).
LD_PRELOAD="$asan $stdcxx" \
  ASAN_OPTIONS=detect_leaks=0 \
  UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
  "$PY" -m pytest -q -p no:cacheprovider --capture=sys tests/test_kernels.py tests/test_calibration_fused.py
echo "sanitizer build and kernel tests: $((SECONDS - start))s"
