"""Subcommands of the ``normact-onnx`` CLI, one module each (``register(subparsers)``)."""

from . import compare_cmd, fold_cmd, inspect_cmd, rewrite_cmd

COMMANDS = [inspect_cmd, rewrite_cmd, fold_cmd, compare_cmd]
