"""``normact-onnx rewrite``: static normalization (or calibrated constants) of a model's activations."""

from __future__ import annotations

import argparse
import sys

from ..errors import NormactError
from ..methods.static import VARIANTS
from ..operations.rewrite import RewriteResult, rewrite_model, write_report
from ..policy import MethodOptions
from ..texttable import plural, table
from .common import OutputArgs, SelectionArgs, add_factor_flags, add_quiet, check_paths, output_label, print_partial


class RewriteMethodArgs:
    """``rewrite``'s method flags: the static variant and q, or the method and factors of ``--stats``."""

    def add(self, p: argparse.ArgumentParser) -> None:
        m = p.add_argument_group("method")
        m.add_argument(
            "--variant",
            choices=VARIANTS,
            help="center-scale: zero mean, unit variance (default; with --stats: the variant calibrate measured); "
            "zeta-zero: also zero mean slope; zeta-zero-unscaled: zeta-zero without the variance rescale "
            "(unit backward gain; ReLU: |x| − √(2q/π)); ratio (this project's own): slope between the two (--ratio)",
        )
        m.add_argument("--q", type=float, default=1.0, help="design variance of the pre-activation (default 1)")
        m.add_argument("--ratio", type=float, help="ζ/η target for --variant ratio")
        m.add_argument(
            "--preserve-function",
            action="store_true",
            help="fold the inverse into the next layers so outputs are unchanged (prepares fine-tuning)",
        )
        m.add_argument(
            "--method",
            choices=("static", "anact"),
            default="static",
            help="static: Gaussian constants (at each site's measured q with --stats); anact: λ, μ from --stats",
        )
        m.add_argument("--stats", metavar="STATS.json", help="calibration statistics (normact-onnx calibrate)")
        m.add_argument(
            "--force",
            action="store_true",
            help="use --stats even though they were measured on another model (their graph fingerprint differs)",
        )
        add_factor_flags(m, defaults=False)

    def value(self, args: argparse.Namespace) -> MethodOptions:
        """The method as the operation takes it (``--method anact`` without ``--stats`` is refused here)."""
        if args.stats is None and args.method == "anact":
            raise NormactError("--method anact needs --stats STATS.json (from normact-onnx calibrate)")
        return MethodOptions(
            args.method, args.variant, args.q, args.ratio, args.lambda_rule, args.centered_rho, args.aggregate
        )


METHOD = RewriteMethodArgs()
SELECTION = SelectionArgs()
OUTPUT = OutputArgs()


def add_output(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    OUTPUT.add_path(g)
    OUTPUT.add_form(g)
    g.add_argument("--report", metavar="FILE.json", help="write every site's constants and decisions as JSON")
    OUTPUT.add_no_verify(g)
    g.add_argument("--explain", action="store_true", help="dry run: say what would change and why, write nothing")
    add_quiet(g)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "rewrite",
        help="normalize activations (static method)",
        description="Rewrite activation sites into normalized form (docs/math.md §1).",
    )
    p.add_argument("model", help="path to an .onnx file")
    METHOD.add(p)
    SELECTION.add(p)
    add_output(p)
    p.set_defaults(handler=run)


def finish(result: RewriteResult, *, explain: bool = False, report: str | None = None, verify: bool = True) -> int:
    """Shared tail of ``rewrite`` and ``calibrate``: the explain/summary tables, the report file, the exit code.

    ``explain``: a dry run (the table of every site, the candidates that did not qualify); ``report``: the JSON
    report's path; ``verify``: whether the written model was verified (what the last line claims).
    """
    rows = [
        {
            "site": o.site.name,
            "kind": o.site.kind,
            "graph": o.site.path,
            "action": o.action,
            "form": o.form,
            "scale": f"{o.affine.scale:.6g}"
            if o.affine and o.affine.is_scalar
            else ("per-channel" if o.affine else ""),
            "shift": f"{o.affine.shift:.6g}" if o.affine and o.affine.is_scalar else "",
            "why": o.reason,
        }
        for o in result.outcomes
    ]
    for note in result.notes:  # warnings too ("looks pretrained"): --quiet silences progress only
        print(note if note.startswith("warning: ") else f"note: {note}", file=sys.stderr)
    if explain or len(rows) <= 200:
        print(table(rows, ["site", "kind", "graph", "action", "form", "scale", "shift", "why"]))
        print()
    print(result.table())
    if explain and result.misses:
        print("\nlooked like activations but did not qualify:")
        print(table(result.misses, ["name", "op", "graph", "why"]))
    if explain:
        print_partial(result)
    if report:
        write_report(result, report)
    if explain:
        print("\n(dry run: nothing written)")
    elif result.path is not None:
        print(f"\nwrote {result.path}" + (f" ({verified(result)})" if verify else ""))
    elif not result.rewritten:
        print("\nnothing to rewrite; nothing written (with -o the output is written as an unchanged copy)")
    return 0


def verified(result: RewriteResult) -> str:
    """What the verification of a written model checked, in words ("verified" alone would claim too much)."""
    checks = ["checker", "ONNX Runtime load"]
    if result.verification:
        checks.append(f"{plural(len(result.verification), 'site')} against the numpy reference")
    if not result.rewritten:
        return "verified: " + ", ".join(checks)
    if result.whole_model and "skipped" not in result.whole_model:
        return "verified: " + ", ".join([*checks, "whole model against the original"])
    return "verified: " + ", ".join(checks) + "; whole model not checked (see the note)"


def run(args: argparse.Namespace) -> int:
    method = METHOD.value(args)
    output = None if args.explain else OUTPUT.path(args)
    check_paths(args, {output_label(args): output, "--report": args.report}, ("--stats", args.stats))
    result = rewrite_model(
        args.model,
        output,
        method=method,
        selection=SELECTION.value(args),
        out=OUTPUT.value(args),
        stats=args.stats,
        preserve_function=args.preserve_function,
        force=args.force,
        dry_run=args.explain,
        progress=not args.quiet,
    )
    return finish(result, explain=args.explain, report=args.report, verify=not args.no_verify)
