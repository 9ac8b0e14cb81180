"""The project's real-model set: models other tools exported, shipped in pinned registry packages.

``manifest.json`` beside this file lists each model (package==version and the member path, or the recipe that derives
it), its sha256, what its producer recorded, its inputs, the sites ``inspect`` finds in it per role, and how to feed it
meaningful data. ``scripts/fetch_real_models.py`` fills the cache these helpers read; nothing here touches the network.

Helpers for tests and benchmarks:

* :func:`entries` — the manifest's models; :func:`model_path` — a model's cached file (None when not fetched).
* :func:`available` — (entry, path) pairs present in the cache; :func:`params` — the same as ``pytest.param``s that
  skip (or, with ``NORMACT_REQUIRE_REAL_MODELS=1``, fail) when a model is missing.
* :func:`sample_batches` — ``n_batches`` feed dicts built from real data by the model's own preprocessing, so
  statistics measured on them are the statistics the model sees in use; :func:`write_batches` — the same as a folder
  of ``.npz`` files for the CLI's ``--data``.
"""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
MANIFEST = HERE / "manifest.json"
ROOT = HERE.parents[1]
FETCH_HINT = (
    "run `python scripts/fetch_real_models.py` (cache: $NORMACT_REAL_MODELS or ~/.cache/normact-onnx/real-models)"
)


def cache_dir() -> Path:
    return Path(os.environ.get("NORMACT_REAL_MODELS") or Path.home() / ".cache" / "normact-onnx" / "real-models")


def required() -> bool:
    """CI sets NORMACT_REQUIRE_REAL_MODELS=1: there a missing model is a failure, not a skip."""
    return os.environ.get("NORMACT_REQUIRE_REAL_MODELS", "") not in ("", "0")


@cache
def _manifest() -> dict[str, Any]:
    return json.loads(MANIFEST.read_text())


def entries() -> list[dict[str, Any]]:
    return list(_manifest()["models"])


def entry(model_id: str) -> dict[str, Any]:
    for e in entries():
        if e["id"] == model_id:
            return e
    raise KeyError(f"no real model {model_id!r} in {MANIFEST}")


def model_path(e: dict[str, Any] | str) -> Path | None:
    """The cached file of a model, or None when it has not been fetched (size checked, not the full sha256)."""
    e = entry(e) if isinstance(e, str) else e
    p = cache_dir() / f"{e['id']}.onnx"
    if not p.is_file():
        return None
    if e["source"]["kind"] == "wheel" and p.stat().st_size != e["size"]:
        return None
    return p


def available() -> list[tuple[dict[str, Any], Path]]:
    """(entry, path) for every manifest model present in the cache."""
    out = []
    for e in entries():
        p = model_path(e)
        if p is not None:
            out.append((e, p))
    return out


def params(ids: list[str] | None = None, marks_by_id: dict[str, Any] | None = None) -> list[Any]:
    """``pytest.param((entry, path), id=...)`` per manifest model, for ``@pytest.mark.parametrize``.

    A model missing from the cache becomes a skipped case telling how to fetch it, or a failing case when
    NORMACT_REQUIRE_REAL_MODELS is set (CI). ``marks_by_id`` adds marks (xfail, slow) to chosen models.
    """
    import pytest

    out = []
    for e in entries():
        if ids is not None and e["id"] not in ids:
            continue
        p = model_path(e)
        extra = (marks_by_id or {}).get(e["id"], [])
        marks = list(extra) if isinstance(extra, (list, tuple)) else [extra]
        if p is None:
            # required (CI): no marks, the case runs and fails in require_path, never as an expected failure
            missing = f"real model {e['id']} not in {cache_dir()}: {FETCH_HINT}"
            marks = [] if required() else [pytest.mark.skip(reason=missing)]
        out.append(pytest.param((e, p), id=e["id"], marks=marks))
    return out


def require_path(e: dict[str, Any], path: Path | None) -> Path:
    """The path, or a failure naming the fetch step (the CI case of :func:`params`)."""
    if path is None:
        raise AssertionError(
            f"real model {e['id']} not in {cache_dir()} although NORMACT_REQUIRE_REAL_MODELS is set: {FETCH_HINT}"
        )
    return path


# ---- meaningful inputs --------------------------------------------------------------------------------------------


@cache
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 handwritten digits, 8×8, ink in [0, 16]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32), d.target


@cache
def _glyph(index: int, height: int) -> np.ndarray:
    """Digit ``index`` scaled (bilinear) to ``height`` pixels, as ink coverage in [0, 1] (cached: pages reuse them)."""
    from scipy.ndimage import zoom

    g = np.clip(zoom(_digits()[0][index] / 16.0, height / 8.0, order=1), 0.0, 1.0)
    g.flags.writeable = False
    return g


def _text_canvas(rng: np.random.Generator, h: int, w: int, glyph_h: int, lines: int | None) -> np.ndarray:
    """Dark digits on a light, slightly uneven paper background, set in lines like text: uint8-range [h, w, 3]."""
    images, _ = _digits()
    paper = 235.0 + rng.normal(0.0, 4.0, (h, w)) + np.linspace(-8, 8, w)[None, :]
    ink = np.zeros((h, w), np.float32)
    gap = max(2, glyph_h // 5)
    n_lines = lines if lines is not None else max(1, (h - gap) // (glyph_h + 2 * gap))
    top = (h - n_lines * (glyph_h + 2 * gap)) // 2 + gap
    for li in range(n_lines):
        y = top + li * (glyph_h + 2 * gap)
        x = gap + int(rng.integers(0, 3 * gap + 1))
        end = w - gap - int(rng.integers(0, w // 4 + 1)) if lines is None else w - gap
        while x + glyph_h <= end and y + glyph_h <= h:
            if rng.random() < 0.12:  # a word space
                x += glyph_h // 2
                continue
            g = _glyph(int(rng.integers(len(images))), glyph_h)
            ink[y : y + glyph_h, x : x + g.shape[1]] = np.maximum(ink[y : y + glyph_h, x : x + g.shape[1]], g)
            x += g.shape[1] - glyph_h // 8
    color = np.array([20.0, 25.0, 40.0])  # dark blue-black ink
    page = paper[..., None] * (1 - ink[..., None]) + color * ink[..., None]
    return np.clip(page, 0, 255)


def _photo(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """One digit filling the frame, tinted, on a smooth coloured background: a crude natural photo [h, w, 3]."""
    from scipy.ndimage import zoom

    images, _ = _digits()
    g = zoom(images[int(rng.integers(len(images)))] / 16.0, (h / 8.0, w / 8.0), order=3)
    g = np.clip(g, 0, 1)[..., None]
    bg = rng.uniform(40, 200, 3)[None, None, :] + np.linspace(-30, 30, h)[:, None, None]
    fg = rng.uniform(0, 255, 3)[None, None, :]
    img = bg * (1 - g) + fg * g + rng.normal(0, 6.0, (h, w, 3))
    return np.clip(img, 0, 255)


def _image_batch(feed: dict[str, Any], rng: np.random.Generator, batch: int) -> np.ndarray:
    """[batch, 3, H, W] float32: the picture recipe, then the model's own scale/mean/std."""
    h, w = feed["height"], feed["width"]
    pics = []
    for _ in range(batch):
        if feed["content"] == "photo":
            pics.append(_photo(rng, h, w))
        else:
            pics.append(_text_canvas(rng, h, w, feed["glyph_height"], feed.get("lines")))
    x = np.stack(pics).astype(np.float32) * np.float32(feed["scale"])
    x = (x - np.asarray(feed["mean"], np.float32)) / np.asarray(feed["std"], np.float32)
    if feed.get("bgr"):
        x = x[..., ::-1]
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)


def _audio_batch(feed: dict[str, Any], rng: np.random.Generator, batch: int) -> np.ndarray:
    """[batch, samples]: a voiced-speech-like mix (harmonics of a gliding pitch, amplitude envelope) plus noise."""
    sr, n = feed["sample_rate"], feed["samples"]
    t = np.arange(n) / sr + rng.uniform(0, 10)
    out = np.empty((batch, n), np.float32)
    for b in range(batch):
        f0 = rng.uniform(90, 260)
        pitch = f0 * (1 + 0.05 * np.sin(2 * np.pi * rng.uniform(2, 6) * t))
        phase = 2 * np.pi * np.cumsum(pitch) / sr
        voiced = sum(np.sin(k * phase) / k for k in range(1, 9))
        env = 0.5 * (1 + np.sin(2 * np.pi * rng.uniform(3, 8) * t + rng.uniform(0, 6.3)))
        speech = rng.random() < 0.7  # some batches are silence with room noise only
        sig = (0.3 * env * voiced if speech else 0.0) + rng.normal(0, 10 ** rng.uniform(-3, -1.5), n)
        out[b] = np.clip(sig, -1, 1)
    return out


@cache
def _byte_corpus() -> tuple[bytes, ...]:
    """Real files of many types from installed packages (source, stubs, text, csv, data, compressed, shared
    libraries, ONNX, protobuf), at most 24 per file suffix, in a fixed order: each file's first and last 4 KiB."""
    import numpy
    import onnx
    import sklearn

    by_suffix: dict[str, list[Path]] = {}
    for root in (Path(onnx.__file__).parent, Path(numpy.__file__).parent, Path(sklearn.__file__).parent):
        for p in sorted(root.rglob("*")):
            if p.suffix != ".pyc" and p.is_file() and p.stat().st_size >= 64:
                by_suffix.setdefault(p.suffix, []).append(p)
    out = []
    for suffix in sorted(by_suffix):
        files = by_suffix[suffix]
        for p in files[:: max(1, len(files) // 24)][:24]:
            with open(p, "rb") as f:
                head = f.read(4096)
                size = f.seek(0, os.SEEK_END)
                f.seek(max(4096, size - 4096))
                out.append(head + f.read())
    return tuple(out)


def _magika_features(data: bytes, feed: dict[str, Any]) -> np.ndarray:
    """Magika's features: first ``beg`` bytes after lstrip and last ``end`` bytes after rstrip, padded; magika 0.5's
    models also take ``mid`` bytes from the middle (here the middle of the stored first and last 4 KiB), padded on
    both sides, and read the byte values as float32."""
    pad, beg, end, block = feed["padding_token"], feed["beg_size"], feed["end_size"], feed["block_size"]
    head = list(data[:block].lstrip()[:beg])
    tail = list(data[-block:].rstrip()[-end:]) if data else []
    mid_size = feed.get("mid_size", 0)
    mid: list[int] = []
    if mid_size:
        start = max(0, (len(data) - mid_size) // 2)
        body = list(data[start : start + mid_size])
        left = (mid_size - len(body)) // 2
        mid = [pad] * left + body + [pad] * (mid_size - len(body) - left)
    row = head + [pad] * (beg - len(head)) + mid + [pad] * (end - len(tail)) + tail
    return np.asarray(row, dtype=feed.get("dtype", "int32"))


def _mel_filters(feed: dict[str, Any]) -> np.ndarray:
    """Triangular mel filters [n_fft // 2 + 1, n_mels] on the HTK mel scale between f_min and f_max (torchaudio's
    MelSpectrogram defaults, which openWakeWord's melspectrogram model was exported from)."""
    sr, n_fft, n_mels = feed["sample_rate"], feed["n_fft"], feed["n_mels"]
    freqs = np.linspace(0, sr / 2, n_fft // 2 + 1)

    def mel(f: Any) -> Any:
        return 2595.0 * np.log10(1.0 + np.asarray(f) / 700.0)

    pts = 700.0 * (10 ** (np.linspace(mel(feed["f_min"]), mel(feed["f_max"]), n_mels + 2) / 2595.0) - 1.0)
    lo, mid, hi = pts[:-2, None], pts[1:-1, None], pts[2:, None]
    up = (freqs[None, :] - lo) / (mid - lo)
    down = (hi - freqs[None, :]) / (hi - mid)
    return np.maximum(0.0, np.minimum(up, down)).T


def _log_mel_batch(feed: dict[str, Any], rng: np.random.Generator, batch: int) -> np.ndarray:
    """[batch, frames, n_mels, 1]: the speech-like audio as openWakeWord feeds its embedding model (power mel
    spectrogram, dB with a floor ``top_db`` below the peak, then ``x * scale + offset``)."""
    n_fft, win, hop, frames = feed["n_fft"], feed["win_length"], feed["hop_length"], feed["frames"]
    n = (frames - 1) * hop + n_fft
    audio = _audio_batch({"sample_rate": feed["sample_rate"], "samples": n}, rng, batch).astype(np.float64)
    window = np.zeros(n_fft)
    start = (n_fft - win) // 2
    window[start : start + win] = np.hanning(win + 1)[:-1]
    idx = np.arange(frames)[:, None] * hop + np.arange(n_fft)[None, :]
    power = np.abs(np.fft.rfft(audio[:, idx] * window, axis=-1)) ** 2
    db = 10.0 * np.log10(np.maximum(power @ _mel_filters(feed), 1e-10))
    db = np.maximum(db, db.max(axis=(1, 2), keepdims=True) - feed["top_db"])
    return (db * feed["scale"] + feed["offset"]).astype(np.float32)[..., None]


@cache
def _tokens(seq: int) -> dict[str, np.ndarray]:
    """Every fixed MiniLM sentence tokenized once (models/minilm.py minilm_inputs), padded/truncated to ``seq``."""
    import sys

    sys.path.insert(0, str(ROOT / "models"))
    try:
        from minilm import SENTENCES, minilm_inputs
    finally:
        sys.path.pop(0)
    out = minilm_inputs(len(SENTENCES), seq)
    for v in out.values():
        v.flags.writeable = False
    return out


def sample_batches(
    e: dict[str, Any] | str, n_batches: int, batch_size: int, seed: int = 0
) -> list[dict[str, np.ndarray]]:
    """``n_batches`` feed dicts of real-looking data for a manifest model, deterministic in ``seed``.

    The recipe is the entry's ``feed`` (documented in the manifest): document pages or text lines of handwritten
    digits for OCR and layout models, digit "photos" for ImageNet classifiers (each normalized as the model's package
    does), speech-like audio for voice detectors with their state zeroed and ``sr`` set, the bytes of real files for
    magika, tokenized sentences for MiniLM, scikit-learn digit rows for the skl2onnx MLPs. Models whose batch
    dimension is fixed at 1 get ``batch_size`` ignored.
    """
    e = entry(e) if isinstance(e, str) else e
    feed = e["feed"]
    if "same_as" in feed:  # a derived model is fed like the model it comes from
        feed = entry(feed["same_as"])["feed"]
    rng = np.random.default_rng([seed, sum(map(ord, e["id"]))])
    batches = []
    for i in range(n_batches):
        b = 1 if feed.get("fixed_batch") else batch_size
        kind = feed["kind"]
        if kind == "image":
            batches.append({feed["input"]: _image_batch(feed, rng, b)})
        elif kind == "audio":
            d = {feed["input"]: _audio_batch(feed, rng, b)}
            for name, spec in feed.get("state", {}).items():
                d[name] = np.zeros([b if s == "batch" else s for s in spec["shape"]], dtype=spec["dtype"])
            for name, spec in feed.get("constants", {}).items():
                d[name] = np.asarray(spec["value"], dtype=spec["dtype"])
            batches.append(d)
        elif kind == "tabular_digits":  # the rows a scikit-learn model was trained on, drawn at random
            images, _ = _digits()
            rows = images.reshape(len(images), -1)[rng.integers(0, len(images), b)]
            if feed.get("rows_as_steps"):  # a recurrent model reads the image row by row: [B, 8 steps, 8 pixels]
                rows = rows.reshape(b, 8, 8)
            batches.append({feed["input"]: (rows * np.float32(feed["scale"])).astype(np.float32)})
        elif kind == "log_mel":
            batches.append({feed["input"]: _log_mel_batch(feed, rng, b)})
        elif kind == "file_bytes":
            corpus = _byte_corpus()
            picks = rng.choice(len(corpus), size=b, replace=False)
            batches.append({feed["input"]: np.stack([_magika_features(corpus[j], feed) for j in picks])})
        elif kind == "tokens":
            table = _tokens(feed["seq"])  # rows: the fixed sentences; batches rotate through them
            rows = (np.arange(b) + i * b + seed) % len(table["input_ids"])
            batches.append({k: v[rows] for k, v in table.items()})
        else:
            raise ValueError(f"{e['id']}: unknown feed kind {kind!r}")
    # a model with float16 inputs (converted without keeping float32 I/O) gets its base model's data in float16
    half = {i["name"] for i in e.get("inputs", ()) if i.get("dtype") == "float16"}
    return [{k: v.astype(np.float16) if k in half else v for k, v in d.items()} for d in batches]


def write_batches(
    e: dict[str, Any] | str, folder: str | os.PathLike, n_batches: int, batch_size: int, seed: int = 0
) -> list[Path]:
    """:func:`sample_batches` as a folder of ``batch_NNN.npz`` (keys = input names), the form the CLI's ``--data``
    reads (one batch per file), for tests that drive ``calibrate``/``compare``/``fold`` as a user would."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, feeds in enumerate(sample_batches(e, n_batches, batch_size, seed)):
        path = out / f"batch_{i:03d}.npz"
        np.savez(path, **feeds)
        paths.append(path)
    return paths
