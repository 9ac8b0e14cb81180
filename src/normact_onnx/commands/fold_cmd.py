"""``normact-onnx fold``: move normalized sites' affine parts into the next layers (zero-cost deployment)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..deploy import EPS_FLOOR, NOISE_FACTOR, fold
from ..io import atomic_path
from ..passes.affine import PADDING
from ..texttable import table
from .common import DataArgs, OutputArgs, add_quiet, check_paths, output_label, print_json

OUTPUT = OutputArgs(".folded.onnx")
DATA = DataArgs(  # the self-check's inputs; fold reads no image folders
    "self-check inputs (default: synthetic)",
    batches_help="use at most this many batches (default: all of --data; synthetic: 2)",
    batch_size_help="split each --data file along axis 0 into batches of this many samples; "
    "the batch size of --synthetic inputs (default 1)",
    images=False,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fold",
        help="fold normalized sites into neighbouring layers",
        description="Turn normalized sites back into plain activations, their affine parts moved into the "
        "consumers' weights (docs/math.md §3). Sites that cannot be folded exactly stay, with the reason.",
    )
    p.add_argument("model", help="a normalized .onnx model")
    OUTPUT.add_path(p)
    p.add_argument(
        "--padding",
        choices=PADDING,
        default="keep-shift",
        help="Conv consumers that pad with zeros: keep-shift = fold the scale, keep the shift as one "
        "1×1 depthwise Conv (default); "
        "pad = explicit Pad with the value a zero stood for (one copy); refuse = leave such sites normalized",
    )
    p.add_argument("--nodes", metavar="REGEX", help="only fold sites whose node or output name matches")
    OUTPUT.add_no_verify(p, "checker, ORT load and the folded-vs-unfolded check")
    DATA.add(p)
    p.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="self-check: largest output difference, as a fraction of the output's scale, at most 0.01 (default: "
        "derived from "
        f"the model: {NOISE_FACTOR:g}× its own float noise on the same inputs, i.e. how far its outputs move when "
        f"ONNX Runtime's graph optimizations are switched off, and at least {EPS_FLOOR} machine epsilons of the "
        "output type, times the output's scale; never more than 1%% of it)",
    )
    p.add_argument("--report", metavar="FILE.json", help="write every site's decision as JSON")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    add_quiet(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    dest = OUTPUT.path(args)
    check_paths(args, {output_label(args): dest, "--report": args.report}, ("--data", args.data))
    result = fold(
        args.model,
        dest,
        padding=args.padding,
        nodes=args.nodes,
        tolerance=args.tolerance,
        details=True,
        progress=not args.quiet,
        output_options=OUTPUT.value(args),
        data_options=DATA.value(args),
    )
    report = result.report()
    if args.report:
        with atomic_path(Path(args.report)) as tmp:
            tmp.write_text(json.dumps(report, indent=2))
    if args.json:
        print_json(report)
        return 0
    for note in result.notes:
        print(f"note: {note}")
    if result.outcomes:
        rows = [
            {"site": o.site.name, "kind": o.site.kind, "graph": o.site.path, "action": o.action, "why": o.reason}
            for o in result.outcomes
        ]
        print(table(rows, ["site", "kind", "graph", "action", "why"]))
    print(f"\n{len(result.folded)} folded, {len(result.kept)} kept")
    if result.check:
        c = result.check
        print(
            f"self-check ({c['batches']} {'synthetic ' if c['synthetic'] else ''}batch(es)): folded vs unfolded "
            f"within {c['max_rel_to_scale']:.2g} of the output scale (allowed {c['allowed_rel_to_scale']:.2g}, "
            f"{'--tolerance' if c['rule'] == 'tolerance' else 'from the float noise'})"
        )
    if result.path is not None:
        what = "" if result.folded else "an unchanged copy, "
        checked = "checker, ONNX Runtime load" + (", folded against unfolded" if result.check else "")
        print(f"wrote {what}{result.path}" + ("" if args.no_verify else f" (verified: {checked})"))
    else:
        print("nothing folded; nothing written")
    return 0
