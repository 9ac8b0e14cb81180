"""Locate the compiled ``ai.normact`` kernel library.

The CMake project in ``runtime_ops/`` is built by the package build
(scikit-build-core) and installs ``libnormact_cpu.so`` (and, where nvcc was
found, ``libnormact_cuda.so``: CPU + CUDA kernels) into the package's ``lib/``
folder, which is found here through :mod:`importlib.resources` so it works for
wheels, zip-safe installs and editable installs alike.

For development against a local CMake build, set ``NORMACT_LIBRARY_DIR`` to
the build folder (e.g. ``build/ops``); it is searched first.

An install without the library (built where no ONNX Runtime headers or no C++
compiler could be found: pure-Python mode) still runs every model in the
function form; :func:`kernel_status` says which case a user has.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import NormactError

CPU_LIBRARY = "libnormact_cpu.so"
CUDA_LIBRARY = "libnormact_cuda.so"
LIBRARY_DIR_ENV = "NORMACT_LIBRARY_DIR"


class KernelLibraryNotFound(NormactError):
    """The kernel library was not built or installed (the model still runs without it)."""


def _candidate_dirs() -> list[Path]:
    dirs: list[Path] = []
    env = os.environ.get(LIBRARY_DIR_ENV)
    if env:
        dirs.append(Path(env))
    try:
        pkg_lib = resources.files("normact_onnx") / "lib"
    except (ModuleNotFoundError, TypeError):  # pragma: no cover - broken install
        pkg_lib = None
    if pkg_lib is not None:
        # files() is a real directory for regular and editable installs; a
        # Traversable that is not one (zip import) cannot be dlopen()ed anyway.
        dirs.append(Path(str(pkg_lib)))
    return dirs


def get_library_path(cuda: bool = False) -> str:
    """Absolute path of the kernel library to pass to ``register_custom_ops_library``.

    ``cuda=True`` asks for ``libnormact_cuda.so`` (CUDA and CPU kernels); it is
    only built where the CUDA compiler was found at build time.
    """
    name = CUDA_LIBRARY if cuda else CPU_LIBRARY
    searched = _candidate_dirs()
    for d in searched:
        path = d / name
        if path.is_file():
            return str(path.resolve())
    where = ", ".join(str(d) for d in searched) or "(nowhere)"
    hint = (
        "it is built only when nvcc is found at build time"
        if cuda
        else "this install is in pure-Python mode (built without ONNX Runtime headers or a C++ compiler): "
        "install the release wheel, or build from source where they are found (README, Install)"
    )
    raise KernelLibraryNotFound(
        f"normact kernel library {name} not found (looked in {where}); {hint}, or set "
        f"{LIBRARY_DIR_ENV} to a CMake build folder of runtime_ops/. Models in the function form "
        "still run without it."
    )


def has_library(cuda: bool = False) -> bool:
    """Whether :func:`get_library_path` would succeed."""
    try:
        get_library_path(cuda)
    except KernelLibraryNotFound:
        return False
    return True


def kernel_library(cuda: bool = False) -> str | None:
    """Path of the kernel library, or None when it was not built (the function bodies run instead)."""
    try:
        return get_library_path(cuda)
    except KernelLibraryNotFound:
        return None


@functools.cache
def info_at(path: str) -> dict[str, Any]:
    """What the library at ``path`` was built with (its ``NormactLibraryInfo`` JSON; cached per path)."""
    lib = ctypes.CDLL(path)
    fn = lib.NormactLibraryInfo
    fn.restype = ctypes.c_char_p
    fn.argtypes = []
    return json.loads(fn().decode())


def library_info(cuda: bool = False) -> dict[str, Any]:
    """What the library was built with: op table (names, attribute defaults), CUDA, CPU ISA, API levels."""
    return dict(info_at(get_library_path(cuda)))


def kernel_status() -> list[str]:
    """One line per kernel library: its path, version and build, or why there is none (``--version``, ``inspect``).

    A library whose version is not the package's (a stale ``NORMACT_LIBRARY_DIR``, a half-updated install) is
    reported as such: it may lack ops the package writes.
    """
    lines = []
    for cuda in (False, True):
        path = kernel_library(cuda)
        if path is None:
            continue
        try:
            info = info_at(path)
        except (OSError, AttributeError, ValueError) as e:
            lines.append(f"kernels: {path} does not load ({e})")
            continue
        built = info.get("version")
        what = "CPU + CUDA" if info.get("cuda") else f"CPU ({info.get('cpu_isa', '?')})"
        stale = ""
        if built != __version__:
            stale = f"; built for normact-onnx {built or '< 0.2.0'}, not {__version__}: rebuild"
        lines.append(f"kernels: {what}, {path}{stale}")
    if not lines:
        lines.append(
            "kernels: unavailable (pure-Python mode: no kernel library was built or installed); models in the "
            "function form still run, with their function bodies"
        )
    return lines
