#!/usr/bin/env bash
# Test a release wheel as a user gets it: a fresh virtual environment on a machine with no compiler and no CMake.
#
#   scripts/test_wheel.sh WHEEL [OTHER_WHEEL ...] [SDIST]
#
# Everything after the environment is created runs with a PATH of the environment's bin/ and one folder holding
# only python3 (CC, CXX, CUDACXX, NORMACT_LIBRARY_DIR, PYTHONPATH unset); the script first checks that no C/C++
# compiler, nvcc, CMake, Ninja, make or ld is reachable there. Then, with the wheel installed (binary wheels only):
#   - normact_onnx is imported from site-packages, and its kernel library loads with the package's version;
#   - the CLI runs the Quickstart (rewrite models/mobilenet_like.torchscript.onnx) and --version names the kernels;
#   - tests/test_kernels.py and tests/test_cli.py pass, run from a copy of tests/ and models/ in a temporary
#     folder (no src/ beside them, so `import normact_onnx` is the installed wheel).
# Each OTHER_WHEEL (the CPU-only wheel scripts/build_release.sh makes beside one with CUDA) is then installed in
# the same environment and checked the same way short of the tests (import, library version, --version, Quickstart).
# With SDIST: the pure-Python fallback. A wheel is built from the sdist offline (no index, no build isolation:
# the tools environment of scripts/build_release.sh) with ONNXRUNTIME_INCLUDE_DIR pointing at an empty folder and
# header fetching off; it must build with no kernel library, install, report the kernels unavailable
# (--version, inspect) and still rewrite and verify the Quickstart model (function form, run by ONNX Runtime).
#
# Environment: PYTHON (default python3), PIP_* as usual (the wheel's dependencies come from the index).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
usage="usage: test_wheel.sh WHEEL [OTHER_WHEEL ...] [SDIST]"
WHEEL=$(realpath "${1:?$usage}")
shift
OTHERS=()
SDIST=
for f in "$@"; do
  case "$f" in
    *.whl) OTHERS+=("$(realpath "$f")") ;;
    *.tar.gz) SDIST=$(realpath "$f") ;;
    *) echo "test_wheel: $f is neither a wheel nor an sdist; $usage" >&2; exit 2 ;;
  esac
done
# the interpreter itself, not a launcher (a pyenv shim is a shell script that needs pyenv on PATH)
PY=$("${PYTHON:-python3}" -c 'import os, sys; print(os.path.realpath(sys.executable))')
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
start=$SECONDS

# ---------------------------------------------------------------- a machine without build tools
mkdir "$WORK/minbin"
ln -s "$PY" "$WORK/minbin/python3"
"$PY" -m venv "$WORK/venv"
V="$WORK/venv/bin"
MINPATH="$V:$WORK/minbin"
# the index settings (PIP_*, certificates) stay; what could point at a build tool or another copy of the package goes
user() {
  env -u CC -u CXX -u CUDACXX -u CMAKE_ARGS -u ONNXRUNTIME_INCLUDE_DIR -u NORMACT_LIBRARY_DIR -u PYTHONPATH \
    -u VIRTUAL_ENV PATH="$MINPATH" PIP_DISABLE_PIP_VERSION_CHECK=1 "$@"
}
for tool in cc c++ gcc g++ clang clang++ nvcc cmake ninja make ld; do
  if user "$V/python" -c 'import shutil, sys; sys.exit(shutil.which(sys.argv[1]) is None)' "$tool"; then
    echo "test_wheel: $tool is reachable on the test PATH ($MINPATH)" >&2
    exit 1
  fi
done

echo "== install $(basename "$WHEEL") (binary wheels only, no build tools on PATH)"
user "$V/pip" install -q --only-binary=:all: "$WHEEL[cpu]" pytest
check_installed() {  # import from site-packages, library version, --version, the Quickstart
  user "$V/python" - <<'PY'
import sysconfig
from pathlib import Path

import normact_onnx
from normact_onnx.runtime import get_library_path, library_info

site = Path(sysconfig.get_paths()["purelib"]).resolve()
where = Path(normact_onnx.__file__).resolve()
assert where.is_relative_to(site), f"normact_onnx imported from {where}, not the installed wheel in {site}"
info = library_info()
assert info["version"] == normact_onnx.__version__, (info["version"], normact_onnx.__version__)
print(f"normact_onnx {normact_onnx.__version__} from {where.parent}; kernel library {get_library_path()} loads")
PY
  user "$V/normact-onnx" --version | tee "$WORK/version.txt"
  grep -q "^kernels: CPU" "$WORK/version.txt" || { echo "test_wheel: --version names no CPU kernel library" >&2; exit 1; }
  rm -rf "$WORK/user/out"
  (cd "$WORK/user" && user "$V/normact-onnx" rewrite models/mobilenet_like.torchscript.onnx -o out/mobilenet_like.normact.onnx)
  [ -s "$WORK/user/out/mobilenet_like.normact.onnx" ] || { echo "test_wheel: the Quickstart wrote nothing" >&2; exit 1; }
}
mkdir "$WORK/user"
cp -r models "$WORK/user/models"
echo "== import, kernel library, the CLI: --version and the Quickstart"
check_installed

echo "== kernel and CLI tests against the installed wheel"
cp -r tests "$WORK/user/tests"
cp pyproject.toml "$WORK/user/"  # pytest's settings (markers) only: there is no src/ beside it
(cd "$WORK/user" && user "$V/python" -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_cli.py)

for other in "${OTHERS[@]}"; do
  echo "== $(basename "$other")"
  user "$V/pip" install -q --no-deps --force-reinstall "$other"
  check_installed
done

if [ -n "$SDIST" ]; then
  echo "== pure-Python fallback: $(basename "$SDIST") built offline with no ONNX Runtime headers"
  TOOLS="$ROOT/build/release-tools"
  [ -x "$TOOLS/bin/python" ] || { echo "test_wheel: no $TOOLS (scripts/build_release.sh makes it)" >&2; exit 1; }
  mkdir "$WORK/empty-include"
  env PIP_NO_INDEX=1 ONNXRUNTIME_INCLUDE_DIR="$WORK/empty-include" NORMACT_FETCH_HEADERS=0 PATH="$TOOLS/bin:$PATH" \
    "$TOOLS/bin/pip" wheel -q --no-deps --no-build-isolation --disable-pip-version-check -w "$WORK/pure" "$SDIST" \
    >"$WORK/pure.log" 2>&1 || { cat "$WORK/pure.log" >&2; echo "test_wheel: the fallback build failed" >&2; exit 1; }
  pure=$(ls "$WORK"/pure/*.whl)
  if unzip -Z1 "$pure" | grep -q '\.so$'; then
    echo "test_wheel: the fallback wheel has a kernel library" >&2
    exit 1
  fi
  user "$V/pip" install -q --no-deps --force-reinstall "$pure"
  user "$V/normact-onnx" --version | tee "$WORK/version.txt"
  grep -q "^kernels: unavailable" "$WORK/version.txt" || { echo "test_wheel: --version does not say unavailable" >&2; exit 1; }
  (cd "$WORK/user" && user "$V/normact-onnx" inspect models/mobilenet_like.torchscript.onnx | tail -n 1 \
    | tee "$WORK/inspect.txt")
  grep -q "^kernels: unavailable" "$WORK/inspect.txt" || { echo "test_wheel: inspect does not say unavailable" >&2; exit 1; }
  # rewrite verifies the written model by running it (function bodies: no kernel library here)
  (cd "$WORK/user" && user "$V/normact-onnx" rewrite models/mobilenet_like.torchscript.onnx -o out/pure.normact.onnx)
  user "$V/python" - "$WORK/user/out/pure.normact.onnx" <<'PY'
import sys

import numpy as np
import onnxruntime as ort

sess = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
i = sess.get_inputs()[0]
x = np.random.default_rng(0).standard_normal([d if isinstance(d, int) else 2 for d in i.shape]).astype(np.float32)
y = sess.run(None, {i.name: x})[0]
assert np.isfinite(y).all()
print(f"function form runs without the kernel library: output {y.shape}")
PY
fi
echo "wheel tested in $((SECONDS - start))s"
