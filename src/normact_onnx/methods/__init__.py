"""Normalization methods: each turns a site into ``scale·(f(x) − shift − slope·x)``."""

from .static import VARIANTS, Affine, static_affine

__all__ = ["VARIANTS", "Affine", "static_affine"]
