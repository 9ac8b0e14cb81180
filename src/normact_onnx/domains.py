"""The standard ONNX operator domain, and the one test every module uses for it.

ONNX spells its own operator set two ways, ``""`` and ``"ai.onnx"``; exporters
write either. A check written inline as a tuple drifts (one place forgets the
second spelling), so every "is this a standard op" question goes through here.
"""

from __future__ import annotations

from typing import Any

STANDARD_DOMAINS = ("", "ai.onnx")


def is_standard_domain(domain: str) -> bool:
    """Whether ``domain`` names the standard ONNX operator set (either spelling)."""
    return domain in STANDARD_DOMAINS


def is_standard(node: Any) -> bool:
    """Whether a ``NodeProto`` (or an opset import, anything with ``.domain``) is in the standard domain."""
    return is_standard_domain(node.domain)


def canonical_domain(domain: str) -> str:
    """``""`` for the standard domain whichever way it is spelled, else the domain itself (dictionary keys)."""
    return "" if is_standard_domain(domain) else domain


__all__ = ["STANDARD_DOMAINS", "canonical_domain", "is_standard", "is_standard_domain"]
