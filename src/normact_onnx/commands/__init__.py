"""Subcommands of the ``normact-onnx`` CLI, one module each (``register(subparsers)``)."""

from . import inspect_cmd, rewrite_cmd

COMMANDS = [inspect_cmd, rewrite_cmd]
