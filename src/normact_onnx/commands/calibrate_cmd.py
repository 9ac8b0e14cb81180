"""``normact-onnx calibrate``: ANAct factors from sample data → calibrated model, statistics JSON, report."""

from __future__ import annotations

import argparse
import sys

from ..calibration.report import factors_table, terminal_table
from ..methods.static import MEASURED_VARIANTS as VARIANTS
from ..operations.calibrate import calibrate_model
from ..operations.rewrite import inspect_sites, rewrite_model
from ..policy import MethodOptions
from ..texttable import plural
from .common import (
    DataArgs,
    OutputArgs,
    RayArgs,
    SelectionArgs,
    add_factor_flags,
    add_quiet,
    check_paths,
    default_output,
    output_label,
)
from .rewrite_cmd import finish

SUFFIX = ".anact.onnx"  # not rewrite's .normact.onnx: the two commands' outputs never overwrite each other


class CalibrateMethodArgs:
    """``calibrate``'s method flags: what the in-situ run normalizes with, and so what the statistics are for."""

    def add(self, p: argparse.ArgumentParser) -> None:
        m = p.add_argument_group("method")
        m.add_argument(
            "--method",
            choices=("anact", "static"),
            default="anact",
            help="anact: λ, μ per site (default); static: --variant from each site's measured moments",
        )
        m.add_argument(
            "--variant",
            choices=VARIANTS,
            default="center-scale",
            help="static method: center-scale (mean/variance of f), zeta-zero or ratio (this project's own; "
            "both also remove the linear part)",
        )
        m.add_argument("--ratio", type=float, help="ζ/η target for --variant ratio")
        add_factor_flags(m)
        m.add_argument("--per-channel", action="store_true", help="one λ, μ per channel (axis inferred per site)")
        m.add_argument(
            "--no-in-situ",
            dest="in_situ",
            action="store_false",
            help="measure the original network instead of normalizing each selected site with its batch's "
            "statistics on the way (in situ, the default, is what keeps deep networks normalized in the written "
            "model)",
        )
        m.add_argument(
            "--closing",
            choices=("auto", "on", "off"),
            default="auto",
            help="in situ: check the pooled constants in the model as written and repair the sites they leave off, "
            "in depth order (one more pass over the data, or a few; auto: when the batches hold fewer than 32 rows)",
        )

    def value(self, args: argparse.Namespace) -> MethodOptions:
        return MethodOptions(
            args.method, args.variant, 1.0, args.ratio, args.lambda_rule, args.centered_rho, args.aggregate
        )


DATA = DataArgs(
    "data",
    batches_help="use at most this many batches (default: all; synthetic: 10)",
    batch_size_help="split each file along axis 0 into batches of this many samples",
)
METHOD = CalibrateMethodArgs()
SELECTION = SelectionArgs()
OUTPUT = OutputArgs(SUFFIX)
RAY = RayArgs()


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate",
        help="ANAct factors from sample data",
        description="Measure each activation site on sample batches (statistics reduced inside the graph) and "
        "write the ANAct-calibrated model (docs/math.md §2), a mergeable statistics JSON and optionally a report.",
    )
    p.add_argument("model", help="path to an .onnx file")
    DATA.add(p)
    METHOD.add(p)
    SELECTION.add(p)
    o = p.add_argument_group("output")
    OUTPUT.add_path(o, "calibrated model")
    o.add_argument(
        "--stats",
        metavar="FILE.json",
        help="statistics file (default: beside the output model, <output>.stats.json, e.g. <model>.anact.stats.json)",
    )
    o.add_argument("--stats-only", action="store_true", help="write the statistics only (for sharded calibration)")
    o.add_argument(
        "--report", dest="html_report", metavar="FILE.html", help="HTML report with per-site plots against depth"
    )
    OUTPUT.add_form(o)
    OUTPUT.add_no_verify(o)
    add_quiet(o, "--no-progress")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    output = None if args.stats_only and not args.output and not args.in_place else OUTPUT.path(args)
    model_out = output or default_output(args.model, SUFFIX)
    stats_path = args.stats or default_output(str(model_out), ".stats.json")
    check_paths(
        args,
        {
            output_label(args): None if args.stats_only else output,
            "--stats" if args.stats else "the statistics file beside the output": stats_path,
            "--report": args.html_report,
        },
        ("--data", args.data),
    )
    if args.stats_only:
        output = None
    elif not inspect_sites(args.model):  # nothing to measure: the verified unchanged copy, as rewrite and fold leave
        copy = rewrite_model(args.model, output, out=OUTPUT.value(args), progress=not args.quiet)
        print("no activation sites found: nothing to calibrate, no statistics written")
        return finish(copy, verify=not args.no_verify)
    selection, out, data = SELECTION.value(args), OUTPUT.value(args), DATA.value(args)
    ray = RAY.value(args)
    result = calibrate_model(
        args.model,
        data,
        output,
        method=METHOD.value(args),
        selection=selection,
        out=out,
        stats_path=stats_path,
        report=args.html_report,
        per_channel=args.per_channel,
        in_situ=args.in_situ,
        closing={"auto": None, "on": True, "off": False}[args.closing],
        progress=not args.quiet,
        ray=ray.ray,
        workers=ray.workers,
    )
    stats = result.stats
    for note in result.notes:
        print(note, file=sys.stderr)
    aggregate = stats.settings.get("aggregate", args.aggregate)
    print(terminal_table(factors_table(stats, args.lambda_rule, args.centered_rho, aggregate)))
    for out_name, why in stats.skipped.items():
        print(f"not calibrated: {out_name}: {why}", file=sys.stderr)
    print(f"\n{plural(stats.batches, 'batch')}, {plural(len(stats.sites), 'site')} in {result.seconds:.2f} s")
    print(f"wrote {stats_path}")
    if args.html_report:
        print(f"wrote {args.html_report}")
    if result.rewrite is not None:
        print()
        return finish(result.rewrite, verify=not args.no_verify)
    return 0
