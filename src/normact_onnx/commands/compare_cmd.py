"""``normact-onnx compare``: run two models on the same inputs; exit 1 when they differ beyond tolerance."""

from __future__ import annotations

import argparse

from ..comparison import compare
from .common import DataArgs, RayArgs, add_quiet, print_json

EXIT_MISMATCH = 1
DATA = DataArgs(
    "inputs (read as calibrate reads them)",
    batches_help="use at most this many batches (default: all of --data; synthetic: 4)",
    batch_size_help="split each --data file along axis 0 into batches of this many samples; "
    "the batch size of --synthetic inputs (default 2)",
    shape_default=" (default: a dimension's name fixes its size across inputs; the leading one is the batch "
    "size, image axes 64, others 16)",
)
RAY = RayArgs()


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="compare two models' outputs (and normalized sites' statistics)",
        description="Run model A and model B on the same inputs and compare every output "
        "(A is the reference: pass when |A−B| ≤ atol + rtol·|A| everywhere). Exit 1 on failure. "
        "With --sites and no B: measure each normalized site of A on the inputs.",
    )
    p.add_argument("model_a", help="reference .onnx model")
    p.add_argument(
        "model_b",
        nargs="?",
        help="model to check (omit it with --reference to check A across runtimes, or with --sites to measure "
        "A's normalized sites alone)",
    )
    DATA.add(p)
    p.add_argument("--atol", type=float, default=1e-4, help="absolute tolerance (default 1e-4)")
    p.add_argument("--rtol", type=float, default=1e-3, help="relative tolerance (default 1e-3)")
    p.add_argument("--sites", action="store_true", help="measure mean/variance at each normalized site (and its input)")
    p.add_argument(
        "--reference",
        action="store_true",
        help="run B (or A itself when B is omitted) in onnx.reference instead of onnxruntime",
    )
    p.add_argument("--cuda", action="store_true", help="run onnxruntime on the CUDA execution provider")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_quiet(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if args.cuda else None
    ray = RAY.value(args)
    result = compare(
        args.model_a,
        args.model_b,
        atol=args.atol,
        rtol=args.rtol,
        sites=args.sites,
        reference=args.reference,
        providers=providers,
        progress=not args.quiet,
        ray=ray.ray,
        workers=ray.workers,
        data_options=DATA.value(args),
    )
    if args.json:
        print_json(result.report())
    else:
        print(result.table())
    return 0 if result.passed else EXIT_MISMATCH
