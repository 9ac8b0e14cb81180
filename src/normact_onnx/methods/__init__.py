"""Normalization methods: each turns a site into ``scale·(f(x) − shift − slope·x)``."""

from typing import Literal, get_args

from .static import VARIANTS, Affine, static_affine

Method = Literal["static", "anact"]
METHODS: tuple[Method, ...] = get_args(Method)
"""The methods ``rewrite`` and ``calibrate`` offer, defined once (:class:`normact_onnx.policy.MethodOptions`)."""

__all__ = ["METHODS", "VARIANTS", "Affine", "Method", "static_affine"]
