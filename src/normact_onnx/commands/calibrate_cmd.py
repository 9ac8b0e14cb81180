"""``normact-onnx calibrate``: ANAct factors from sample data → calibrated model, statistics JSON, report."""

from __future__ import annotations

import argparse
import sys

from ..methods.anact import AGGREGATES, LAMBDA_RULES
from ..passes.normalize import FORMS
from .common import default_output
from .rewrite_cmd import add_selection, finish


def add_anact_options(g: argparse._ArgumentGroup, defaults: bool = True) -> None:
    """The factor options shared by ``calibrate`` and ``rewrite --method anact`` (None there: take the file's)."""
    g.add_argument(
        "--lambda-rule",
        choices=LAMBDA_RULES,
        default="anact" if defaults else None,
        help="λ = √((ρ+ρ')/(2ρρ')) (anact, default) or √(2/(ρ+ρ')) (xavier)",
    )
    g.add_argument(
        "--centered-rho",
        action="store_true",
        default=False if defaults else None,
        help="forward gain from Var f instead of E f²",
    )
    g.add_argument(
        "--aggregate",
        choices=AGGREGATES,
        default="ema" if defaults else None,
        help="ema: the paper's gated running update (order-dependent; default); "
        "mean: exact moments over all batches (what merge-stats reproduces)",
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate",
        help="ANAct factors from sample data",
        description="Measure each activation site on sample batches (statistics reduced inside the graph) and "
        "write the ANAct-calibrated model (MATH.md §2), a mergeable statistics JSON and optionally a report.",
    )
    p.add_argument("model", help="path to an .onnx file")
    d = p.add_argument_group("data")
    d.add_argument("--data", help=".npz (keys = input names), .npy, a folder of them, or a test_data_set_* folder")
    d.add_argument("--synthetic", action="store_true", help="N(0,1) inputs (integers in {0,1}) instead of data")
    d.add_argument(
        "--shape",
        action="append",
        metavar="NAME=D1xD2…",
        help="shape of a synthetic input with symbolic dimensions (repeatable), e.g. x=1x3x224x224",
    )
    d.add_argument("--batches", type=int, help="use at most this many batches (default: all; synthetic: 10)")
    d.add_argument("--batch-size", type=int, help="split each file along axis 0 into batches of this many samples")
    d.add_argument("--seed", type=int, default=0, help="seed of --synthetic data")
    m = p.add_argument_group("ANAct")
    add_anact_options(m)
    m.add_argument("--per-channel", action="store_true", help="one λ, μ per channel (axis inferred per site)")
    add_selection(p)
    o = p.add_argument_group("output")
    o.add_argument("-o", "--output", help="calibrated model (default: <model>.normact.onnx beside the input)")
    o.add_argument("--in-place", action="store_true", help="overwrite the input model")
    o.add_argument("--stats", metavar="FILE.json", help="statistics file (default: <model>.stats.json)")
    o.add_argument("--stats-only", action="store_true", help="write the statistics only (for sharded calibration)")
    o.add_argument(
        "--report", dest="html_report", metavar="FILE.html", help="HTML report with per-site plots against depth"
    )
    o.add_argument("--form", choices=FORMS, default="function", help="how normalized sites are written")
    o.add_argument("--no-verify", action="store_true", help="skip checker, ORT load and per-site numeric checks")
    o.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(handler=run, report=None)  # rewrite's JSON --report (shared ``finish``) is not offered here


def run(args: argparse.Namespace) -> int:
    from ..calibration.report import terminal_table
    from ..calibration.run import calibrate, factors_table

    output = None
    if not args.stats_only:
        output = args.model if args.in_place else (args.output or default_output(args.model))
    stats_path = args.stats or default_output(args.model, ".stats.json")
    result = calibrate(
        args.model,
        args.data,
        output,
        stats_path=stats_path,
        report=args.html_report,
        batches=args.batches,
        batch_size=args.batch_size,
        synthetic=args.synthetic,
        shapes=args.shape,
        seed=args.seed,
        per_channel=args.per_channel,
        lambda_rule=args.lambda_rule,
        centered_rho=args.centered_rho,
        aggregate=args.aggregate,
        progress=not args.no_progress and sys.stderr.isatty(),
        include=args.include,
        exclude=args.exclude,
        nodes=args.nodes,
        all_sites=args.all_sites,
        form=args.form,
        verify=not args.no_verify,
        in_place=args.in_place,
        details=True,
    )
    stats = result.stats
    print(terminal_table(factors_table(stats, args.lambda_rule, args.centered_rho, args.aggregate)))
    for out, why in stats.skipped.items():
        print(f"not calibrated: {out}: {why}", file=sys.stderr)
    print(f"\n{stats.batches} batches, {len(stats.sites)} sites in {result.seconds:.2f} s")
    print(f"wrote {stats_path}")
    if args.html_report:
        print(f"wrote {args.html_report}")
    if result.rewrite is not None:
        print()
        args.explain = False
        return finish(args, result.rewrite)
    return 0
