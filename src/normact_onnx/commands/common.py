"""What the subcommands share: argument groups (one class per concern), output paths, JSON.

An argument group, in the manner of Polygraphy's, is one class per concern that both adds its flags to a parser
and turns the parsed flags into the option value the API takes: :class:`SelectionArgs` gives a
:class:`..selection.SiteSelection`, :class:`DataArgs` a :class:`..data.options.DataOptions`,
:class:`OutputArgs` an :class:`..writer.OutputOptions` (and the output path), the method groups of ``rewrite`` and
``calibrate`` a :class:`..policy.MethodOptions`. So a flag and its meaning are written in one place, and no command
reads another concern's flags or changes ``args``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data.options import DataOptions
from ..data.rows import ImageOptions
from ..errors import NormactError
from ..methods.anact import AGGREGATES, LAMBDA_RULES
from ..operations.rewrite import RewriteResult
from ..outpaths import IN_PLACE, Named, beside, check_run_paths, model_files
from ..passes.find import Explanation, grouped
from ..passes.normalize import FORMS
from ..selection import SiteSelection
from ..writer import OutputOptions

Arguments = argparse.ArgumentParser | argparse._ArgumentGroup


class SelectionArgs:
    """``--include``, ``--exclude``, ``--nodes``, ``--all-sites``: the sites a command normalizes."""

    def add(self, p: argparse.ArgumentParser) -> None:
        g = p.add_argument_group("which sites")
        g.add_argument("--include", help="comma-separated kinds to rewrite (e.g. relu,gelu)")
        g.add_argument("--exclude", help="comma-separated kinds to leave alone")
        g.add_argument("--nodes", metavar="REGEX", help="only sites whose node or output name matches")
        g.add_argument(
            "--all-sites",
            action="store_true",
            help="also rewrite graph outputs and multiplicative gates (skipped by default)",
        )

    def value(self, args: argparse.Namespace) -> SiteSelection:
        """The one value ``rewrite``, ``calibrate`` and their operations take."""
        return SiteSelection.parse(args.include, args.exclude, args.nodes, args.all_sites)


class ImageArgs:
    """``--image-size``, ``--scale``, ``--mean``, ``--std``, ``--layout``, ``--image-input``: image folders."""

    def add(self, p: argparse.ArgumentParser) -> None:
        g = p.add_argument_group("image folders (--data DIR of .png/.jpg/…: decode, resize, pixel·scale, (−mean)/std)")
        g.add_argument("--image-size", metavar="HxW", help="resize to this size, bilinear (default: the input's size)")
        g.add_argument("--scale", type=float, help="multiply pixel values 0…255 by this (default 1/255)")
        g.add_argument("--mean", metavar="M[,M,M]", help="subtract per channel after scaling (default 0)")
        g.add_argument("--std", metavar="S[,S,S]", help="divide per channel after the mean (default 1)")
        g.add_argument("--layout", choices=("nchw", "nhwc"), default="nchw", help="input tensor layout (default nchw)")
        g.add_argument(
            "--image-input", metavar="NAME", help="the input that receives the images (default: the only one)"
        )

    def value(self, args: argparse.Namespace) -> ImageOptions:
        """The options as :class:`..data.rows.ImageOptions` (its defaults when none was given)."""
        return ImageOptions.parse(args.image_size, args.scale, args.mean, args.std, args.layout, args.image_input)


@dataclass(frozen=True)
class RayOptions:
    """``--ray`` and ``--workers``: where the batches run (``ray`` None: in this process)."""

    ray: bool | str | None = None
    workers: int = 2


class RayArgs:
    """``--ray [ADDRESS]`` and ``--workers``: the batches on Ray Data actors."""

    def add(self, p: argparse.ArgumentParser) -> None:
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

    def value(self, args: argparse.Namespace) -> RayOptions:
        return RayOptions(args.ray, args.workers)


@dataclass(frozen=True)
class DataArgs:
    """Where sample inputs come from (calibrate, compare, fold): ``--data`` or ``--synthetic``, how many batches,
    the image options and the Ray options (:class:`ImageArgs`, :class:`RayArgs`).

    ``images=False``: :meth:`value` leaves the image options out (``fold``'s self-check reads no image folders).
    """

    title: str
    batches_help: str
    batch_size_help: str
    batches: int | None = None
    batch_size: int | None = None
    shape_default: str = ""
    images: bool = True

    def add(self, p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
        d = p.add_argument_group(self.title)
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
            help="shape of a synthetic input with symbolic dimensions (repeatable), "
            f"e.g. x=1x3x224x224{self.shape_default}",
        )
        d.add_argument(
            "--value",
            action="append",
            metavar="NAME=V",
            help="fill a synthetic input with V (repeatable), e.g. sr=16000 (default: floats N(0,1), integers 0/1, "
            "a scalar sample rate input 16000)",
        )
        d.add_argument("--batches", type=int, default=self.batches, help=self.batches_help)
        d.add_argument("--batch-size", type=int, default=self.batch_size, help=self.batch_size_help)
        d.add_argument("--seed", type=int, default=0, help="seed of --synthetic data")
        ImageArgs().add(p)
        RayArgs().add(p)
        return d

    def value(self, args: argparse.Namespace) -> DataOptions:
        """The one value ``calibrate``, ``compare`` and ``fold`` take."""
        return DataOptions(
            args.data,
            args.batches,
            args.batch_size,
            args.synthetic,
            args.shape,
            args.value,
            args.seed,
            ImageArgs().value(args) if self.images else None,
        )


def add_factor_flags(g: Arguments, defaults: bool = True, aggregate: bool = True) -> None:
    """ANAct's factor flags (``--lambda-rule``, ``--centered-rho``, ``--aggregate``), the part of the method groups
    of ``calibrate``, ``finetune`` and ``rewrite --method anact`` they share (``defaults=False``: None, so the
    statistics file's choice applies)."""
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


@dataclass(frozen=True)
class OutputArgs:
    """How and where a command writes its model: ``-o``/``--in-place``, ``--form``, ``--no-verify``.

    The flags go where each command's help places them (:meth:`add_path`, :meth:`add_form`, :meth:`add_no_verify`);
    :meth:`value` gives the :class:`..writer.OutputOptions`, :meth:`path` the output path, ``suffix`` the default
    name's (``<model><suffix>`` beside the input).
    """

    suffix: str = ".normact.onnx"

    def add_path(self, g: Arguments, what: str = "output path") -> None:
        g.add_argument(
            "-o",
            "--output",
            help=f"{what} (default: <model>{self.suffix} beside the input); written even when nothing changes (a copy)",
        )
        g.add_argument("--in-place", action="store_true", help="overwrite the input model (keeps its file mode)")

    def add_form(self, g: Arguments) -> None:
        g.add_argument(
            "--form",
            choices=FORMS,
            default="function",
            help="function: Norm<Act> ops with model-local function bodies (default); "
            "subgraph: standard ops only; custom-op: fused ops that need the kernel library; layout: function, "
            "except sites ONNX Runtime runs fused in its NCHWc convolutions (their op + a depthwise Conv)",
        )

    def add_no_verify(self, g: Arguments, checks: str = "checker, ORT load and per-site numeric checks") -> None:
        g.add_argument("--no-verify", action="store_true", help=f"skip {checks}")

    def path(self, args: argparse.Namespace) -> str | Path:
        """Where the flags say the model goes (checked with the others by :func:`check_paths`)."""
        if args.in_place and args.output:
            raise NormactError("--in-place and -o conflict: --in-place overwrites the input; pass one of them")
        return args.model if args.in_place else (args.output or default_output(args.model, self.suffix))

    def value(self, args: argparse.Namespace) -> OutputOptions:
        """The one value the operations take. Without ``-o`` (a default output name) an unchanged model is not
        copied; a command without ``--form`` (``fold``) keeps the default."""
        form = getattr(args, "form", OutputOptions.form)
        return OutputOptions(form, not args.no_verify, args.in_place, args.output is not None)


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


def add_quiet(g: Arguments, *aliases: str) -> None:
    """``--quiet``: no progress bar (bars only appear when stderr is a terminal anyway)."""
    g.add_argument("--quiet", *aliases, dest="quiet", action="store_true", help="no progress bar on stderr")


def default_output(src: str, suffix: str = ".normact.onnx") -> Path:
    """``model.onnx`` (or ``MODEL.ONNX``) → ``model.normact.onnx`` beside it."""
    return beside(src, suffix)


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2)
    sys.stdout.write("\n")


SHOWN = 3  # names listed per group of half-matched candidates that fail the same way


def print_partial(why: Explanation | RewriteResult) -> None:
    """The half-matched forms (``inspect --explain`` and ``rewrite --explain`` alike)."""
    if not why.partial:
        print("\nno half-matched patterns")
        return
    print("\nhalf-matched patterns (kind, form, at which node, how far it got, where and why it stopped):")
    for first, more in grouped(why.partial):
        where = "" if first.graph == "main" else f" [in {first.graph}]"
        line = f"  {first.line()}{where}"
        if more:
            names = ", ".join(f"'{p.anchor}'" for p in more[:SHOWN])
            line += f"  (also at {names}{', …' if len(more) > SHOWN else ''}: {len(more) + 1} in all)"
        print(line)
