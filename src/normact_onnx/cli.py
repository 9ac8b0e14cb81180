"""The ``normact-onnx`` command.

Each subcommand lives in :mod:`normact_onnx.commands` as a module with
``register(subparsers)``; this file only dispatches and turns user errors into
one line on stderr with a non-zero exit code (never a traceback).
"""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .commands import COMMANDS
from .errors import NormactError
from .runtime.library import kernel_status

EXIT_USER_ERROR = 2
EXIT_BROKEN_PIPE = 128 + 13  # what a shell reports for a process ended by SIGPIPE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="normact-onnx",
        description="Normalized activations for ONNX models: find, rewrite, calibrate, fold, compare.",
    )
    parser.add_argument("--version", action=_VersionAction, help="show the version and the kernel libraries, and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in COMMANDS:
        module.register(sub)
    return parser


class _VersionAction(argparse.Action):
    """``--version``: the package version and what the kernel libraries are (found only when asked)."""

    def __init__(self, option_strings: list[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> None:
        try:
            print("\n".join([f"normact-onnx {__version__}", *kernel_status()]), flush=True)
        except BrokenPipeError:  # `normact-onnx --version | head -1`: quiet, as for every command
            parser.exit(_broken_pipe())
        parser.exit()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = int(args.handler(args) or 0)
        sys.stdout.flush()  # a reader gone before the last buffered lines: handled here, not at exit
        return code
    except NormactError as e:
        print(f"normact-onnx: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("normact-onnx: interrupted; nothing was written", file=sys.stderr)
        if argv is None and "ray" in sys.modules:
            _leave_now(130)
        return 130
    except BrokenPipeError:
        return _broken_pipe()
    except Exception as e:
        print(
            f"normact-onnx: internal error: {type(e).__name__}: {e} (set NORMACT_DEBUG=1 for details)", file=sys.stderr
        )
        import os

        if os.environ.get("NORMACT_DEBUG"):
            raise
        return 1


def _leave_now(code: int) -> None:
    """End the program without the interpreter's teardown, after the exit handlers ran.

    After Ctrl-C in a ``--ray`` run the cluster is already shut down (the command's own cleanup), but Ray's
    native threads may still call into Python while the interpreter finalizes, which can end the process with
    SIGSEGV instead of the exit code (a known Ray problem). Only the program does this (``argv`` None), never
    a caller of :func:`main` in its own process.
    """
    import atexit
    import os

    sys.stdout.flush()
    sys.stderr.flush()
    atexit._run_exitfuncs()  # temporary files registered for removal, Ray's own shutdown (a no-op by now)
    os._exit(code)


def _broken_pipe() -> int:
    """The reader of stdout went away (``normact-onnx inspect m.onnx | head``): stop quietly.

    Python would report the pipe again when it flushes stdout at exit, so stdout is pointed
    at /dev/null first; the exit code is the shell's for a process ended by SIGPIPE.
    """
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
