"""Helpers the subcommands share: argument groups, output paths, JSON."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..data.options import DataOptions
from ..data.rows import ImageOptions
from ..errors import NormactError
from ..methods.anact import AGGREGATES, LAMBDA_RULES
from ..outpaths import IN_PLACE, Named, beside, check_run_paths, model_files
from ..passes.normalize import FORMS
from ..selection import SiteSelection
from ..writer import OutputOptions

Arguments = argparse.ArgumentParser | argparse._ArgumentGroup


def add_selection(p: argparse.ArgumentParser) -> None:
    """Site-selection flags shared by every command that rewrites."""
    g = p.add_argument_group("which sites")
    g.add_argument("--include", help="comma-separated kinds to rewrite (e.g. relu,gelu)")
    g.add_argument("--exclude", help="comma-separated kinds to leave alone")
    g.add_argument("--nodes", metavar="REGEX", help="only sites whose node or output name matches")
    g.add_argument(
        "--all-sites",
        action="store_true",
        help="also rewrite graph outputs and multiplicative gates (skipped by default)",
    )


def site_selection(args: argparse.Namespace) -> SiteSelection:
    """The flags of :func:`add_selection` as the one value ``rewrite`` and ``calibrate`` take."""
    return SiteSelection.parse(args.include, args.exclude, args.nodes, args.all_sites)


def output_options(args: argparse.Namespace) -> OutputOptions:
    """``--form``, ``--no-verify``, ``--in-place`` and ``-o`` as the one value ``rewrite`` and ``calibrate`` take.

    Without ``-o`` (a default output name) an unchanged model is not copied.
    """
    return OutputOptions(args.form, not args.no_verify, args.in_place, args.output is not None)


def add_data_source(
    p: argparse.ArgumentParser,
    title: str,
    *,
    batches_help: str,
    batch_size_help: str,
    batches: int | None = None,
    batch_size: int | None = None,
    shape_default: str = "",
) -> argparse._ArgumentGroup:
    """Where sample inputs come from (calibrate, compare, fold): --data or --synthetic, and how many batches."""
    d = p.add_argument_group(title)
    d.add_argument(
        "--data",
        help=".npz (keys = input names), .npy, a folder of them, ONNX test_data_set_* folders, "
        "Parquet files or folders (columns = input names), or an image folder (see the image options)",
    )
    d.add_argument("--synthetic", action="store_true", help="N(0,1) inputs (integers in {0,1}) instead of data")
    d.add_argument(
        "--shape",
        action="append",
        metavar="NAME=D1xD2…",
        help=f"shape of a synthetic input with symbolic dimensions (repeatable), e.g. x=1x3x224x224{shape_default}",
    )
    d.add_argument(
        "--value",
        action="append",
        metavar="NAME=V",
        help="fill a synthetic input with V (repeatable), e.g. sr=16000 (default: floats N(0,1), integers 0/1, "
        "a scalar sample rate input 16000)",
    )
    d.add_argument("--batches", type=int, default=batches, help=batches_help)
    d.add_argument("--batch-size", type=int, default=batch_size, help=batch_size_help)
    d.add_argument("--seed", type=int, default=0, help="seed of --synthetic data")
    _add_image_options(p)
    _add_ray_options(p)
    return d


def _add_image_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("image folders (--data DIR of .png/.jpg/…: decode, resize, pixel·scale, (−mean)/std)")
    g.add_argument("--image-size", metavar="HxW", help="resize to this size, bilinear (default: the input's size)")
    g.add_argument("--scale", type=float, help="multiply pixel values 0…255 by this (default 1/255)")
    g.add_argument("--mean", metavar="M[,M,M]", help="subtract per channel after scaling (default 0)")
    g.add_argument("--std", metavar="S[,S,S]", help="divide per channel after the mean (default 1)")
    g.add_argument("--layout", choices=("nchw", "nhwc"), default="nchw", help="input tensor layout (default nchw)")
    g.add_argument("--image-input", metavar="NAME", help="the input that receives the images (default: the only one)")


def _add_ray_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Ray Data (pip install 'normact-onnx[ray]')")
    g.add_argument(
        "--ray",
        nargs="?",
        const=True,
        default=None,
        metavar="ADDRESS",
        help="run the batches on Ray Data actors: alone, a local cluster for this command; "
        "'auto' or HOST:PORT, an existing cluster (ray start --head …)",
    )
    g.add_argument("--workers", type=int, default=2, help="Ray actors, one ONNX Runtime session each (default 2)")


def image_options(args: argparse.Namespace) -> Any:
    """The --image-* options as ImageOptions (defaults when none was given)."""
    return ImageOptions.parse(args.image_size, args.scale, args.mean, args.std, args.layout, args.image_input)


def data_options(args: argparse.Namespace, images: bool = True) -> DataOptions:
    """The flags of :func:`add_data_source` as the one value ``calibrate`` and ``fold`` take.

    ``images=False``: leave the --image-* options out (``fold``'s self-check reads no image folders).
    """
    return DataOptions(
        args.data,
        args.batches,
        args.batch_size,
        args.synthetic,
        args.shape,
        args.value,
        args.seed,
        image_options(args) if images else None,
    )


def add_anact_options(g: Arguments, defaults: bool = True, aggregate: bool = True) -> None:
    """The factor options of ``calibrate``, ``finetune`` and ``rewrite --method anact`` (None there: the file's)."""
    g.add_argument(
        "--lambda-rule",
        choices=LAMBDA_RULES,
        default="anact" if defaults else None,
        help="λ = √((ρ+ρ')/(2ρρ')) (anact, the paper's; default) or √(2/(ρ+ρ')) (xavier, this project's own)",
    )
    g.add_argument(
        "--centered-rho",
        action="store_true",
        default=False if defaults else None,
        help="forward gain from Var f instead of E f²",
    )
    if aggregate:
        g.add_argument(
            "--aggregate",
            choices=AGGREGATES,
            default="ema" if defaults else None,
            help="ema: the paper's gated running update (order-dependent; default); "
            "mean: exact moments over all batches (what merge-stats reproduces)",
        )


def add_output_path(g: Arguments, what: str = "output path", suffix: str = ".normact.onnx") -> None:
    """-o/--output and --in-place of the commands that write a model next to the input."""
    g.add_argument(
        "-o",
        "--output",
        help=f"{what} (default: <model>{suffix} beside the input); written even when nothing changes (a copy)",
    )
    g.add_argument("--in-place", action="store_true", help="overwrite the input model (keeps its file mode)")


def output_path(args: argparse.Namespace, suffix: str = ".normact.onnx") -> str | Path:
    """Where ``add_output_path``'s flags say the model goes (checked with the others by :func:`check_paths`)."""
    if args.in_place and args.output:
        raise NormactError("--in-place and -o conflict: --in-place overwrites the input; pass one of them")
    return args.model if args.in_place else (args.output or default_output(args.model, suffix))


def output_label(args: argparse.Namespace) -> str:
    """How messages name the model output: the flag that chose it, or ``output`` for the default name."""
    return IN_PLACE if getattr(args, "in_place", False) else "-o" if args.output else "output"


def check_paths(
    args: argparse.Namespace, outputs: dict[str, str | Path | None], *inputs: tuple[str, str | None]
) -> None:
    """The one output-path rule (:mod:`..outpaths`) for a command reading ``args.model``, before any work starts.

    ``outputs``: label → path this run writes; ``inputs``: (label, path) of further files it reads
    (``--data``, ``--stats``), besides the model and its external data files.
    """
    model = model_files(args.model)
    dest = outputs.get(output_label(args)) if hasattr(args, "in_place") else None
    beside_model: dict[str, str | Path] = {}
    if dest is not None and len(model) > 1:  # external data: the files written beside the model output
        beside_model["the data file beside the output"] = f"{dest}.data"
        for ext in model[1:]:
            beside_model[f"the copy of {ext.path.name} beside the output"] = Path(dest).parent / ext.path.name
    read = model + [Named(label, Path(p)) for label, p in inputs if p]
    check_run_paths(
        outputs, read, offers_in_place=hasattr(args, "in_place"), folders=("--workdir",), beside_model=beside_model
    )


def add_form(g: Arguments) -> None:
    g.add_argument(
        "--form",
        choices=FORMS,
        default="function",
        help="function: Norm<Act> ops with model-local function bodies (default); "
        "subgraph: standard ops only; custom-op: fused ops that need the kernel library",
    )


def add_quiet(g: Arguments, *aliases: str) -> None:
    """``--quiet``: no progress bar (bars only appear when stderr is a terminal anyway)."""
    g.add_argument("--quiet", *aliases, dest="quiet", action="store_true", help="no progress bar on stderr")


def add_no_verify(g: Arguments, checks: str = "checker, ORT load and per-site numeric checks") -> None:
    g.add_argument("--no-verify", action="store_true", help=f"skip {checks}")


def default_output(src: str, suffix: str = ".normact.onnx") -> Path:
    """``model.onnx`` (or ``MODEL.ONNX``) → ``model.normact.onnx`` beside it."""
    return beside(src, suffix)


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2)
    sys.stdout.write("\n")
