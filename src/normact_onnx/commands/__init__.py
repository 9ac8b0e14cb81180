"""Subcommands of the ``normact-onnx`` CLI, one module each (``register(subparsers)``)."""

from . import calibrate_cmd, compare_cmd, finetune_cmd, fold_cmd, inspect_cmd, merge_stats_cmd, rewrite_cmd

COMMANDS = [inspect_cmd, rewrite_cmd, fold_cmd, compare_cmd, finetune_cmd, calibrate_cmd, merge_stats_cmd]
