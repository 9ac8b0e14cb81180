"""``normact-onnx merge-stats``: combine calibration statistics of shards (exactly, for --aggregate mean)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..calibration.stats import CalibrationStats, merge
from ..outpaths import Named, check_run_paths
from ..texttable import plural


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "merge-stats",
        help="merge calibration statistics files",
        description="Merge statistics of calibration shards: the moments combine exactly (the same as one run "
        "over all the data); the order-dependent EMA state is dropped, so factors from the result use "
        "--aggregate mean.",
    )
    p.add_argument("inputs", nargs="+", metavar="STATS.json", help="statistics files written by calibrate")
    p.add_argument("-o", "--output", required=True, metavar="OUT.json", help="the merged statistics file")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    check_run_paths({"-o": args.output}, [Named("the input", Path(p)) for p in args.inputs])
    merged = merge([CalibrationStats.load(p) for p in args.inputs])
    merged.save(args.output)
    counts = f"{plural(merged.batches, 'batch')}, {plural(len(merged.sites), 'site')}"
    print(f"merged {plural(len(args.inputs), 'file')}: {counts} → {args.output}")
    return 0
