"""The ``normact-onnx`` command.

Each subcommand lives in :mod:`normact_onnx.commands` as a module with
``register(subparsers)``; this file only dispatches and turns user errors into
one line on stderr with a non-zero exit code (never a traceback).
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import traceback

from . import __version__
from .commands import COMMANDS
from .errors import NormactError
from .progress import quiet_libraries
from .runtime.library import kernel_status

EXIT_OK = 0
EXIT_MISMATCH = 1  # compare: the models differ beyond the tolerance
EXIT_USER_ERROR = 2  # bad input or environment: a file, an option, memory, disk; one line on stderr
EXIT_INTERNAL = 3  # a bug in normact-onnx: one line, the traceback with --verbose or NORMACT_DEBUG=1
EXIT_BROKEN_PIPE = 128 + 13  # what a shell reports for a process ended by SIGPIPE
EPILOG = (
    "exit codes: 0 ok; 1 compare found a difference; 2 bad input (a file, an option, memory, disk: one line "
    "on stderr, nothing written); 3 internal error (a bug: --verbose or NORMACT_DEBUG=1 shows the traceback); "
    "130 interrupted"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="normact-onnx",
        description="Normalized activations for ONNX models: find, rewrite, calibrate, fold, compare.",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action=_VersionAction, help="show the version and the kernel libraries, and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in COMMANDS:
        module.register(sub)
    for command in sub.choices.values():
        command.epilog = EPILOG
        command.add_argument(
            "--verbose",
            action="store_true",
            help="show what libraries log (ONNX Runtime, Ray), numpy warnings and an internal error's traceback",
        )
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
    verbose = bool(getattr(args, "verbose", False) or os.environ.get("NORMACT_DEBUG"))
    try:
        with quiet_libraries(verbose):
            code = int(args.handler(args) or 0)
        sys.stdout.flush()  # a reader gone before the last buffered lines: handled here, not at exit
        return code
    except NormactError as e:
        return _error(str(e))
    except KeyboardInterrupt:
        print("normact-onnx: interrupted; nothing was written", file=sys.stderr)
        if argv is None and "ray" in sys.modules:
            _leave_now(130)
        return 130
    except BrokenPipeError:
        return _broken_pipe()
    except MemoryError as e:
        return _error(
            f"out of memory ({str(e) or 'an allocation failed'}); use a smaller --batch-size or fewer/smaller inputs"
        )
    except UnicodeError as e:
        return _error(f"text that is not valid UTF-8 (a file name or a file's content): {e}")
    except OSError as e:
        return _error(_os_error(e))
    except Exception as e:
        print(
            f"normact-onnx: internal error (a bug in normact-onnx): {type(e).__name__}: {e} "
            "(rerun with --verbose or NORMACT_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        if verbose:
            traceback.print_exc()
        return EXIT_INTERNAL


def _error(message: str) -> int:
    """Bad input or environment: one line on stderr (however many lines the cause's text had)."""
    print(f"normact-onnx: error: {' '.join(message.split())}", file=sys.stderr)
    return EXIT_USER_ERROR


def _os_error(e: OSError) -> str:
    """A file-system failure in the user's words: which file, what happened, what to do about a full disk."""
    where = f"{e.filename}: " if e.filename else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{where}no space left on the device (or quota exceeded); free some space or write elsewhere"
    return f"{where}{e.strerror or e}"


def _leave_now(code: int) -> None:
    """End the program without the interpreter's teardown, after the exit handlers ran.

    After Ctrl-C in a ``--ray`` run the cluster is already shut down (the command's own cleanup), but Ray's
    native threads may still call into Python while the interpreter finalizes, which can end the process with
    SIGSEGV instead of the exit code (a known Ray problem). Only the program does this (``argv`` None), never
    a caller of :func:`main` in its own process.
    """
    import atexit

    sys.stdout.flush()
    sys.stderr.flush()
    atexit._run_exitfuncs()  # temporary files registered for removal, Ray's own shutdown (a no-op by now)
    os._exit(code)


def _broken_pipe() -> int:
    """The reader of stdout went away (``normact-onnx inspect m.onnx | head``): stop quietly.

    Python would report the pipe again when it flushes stdout at exit, so stdout is pointed
    at /dev/null first; the exit code is the shell's for a process ended by SIGPIPE.
    """

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
