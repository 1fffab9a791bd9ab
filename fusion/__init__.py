"""Fusion stage: fused scores, NMS, output writers, and the :class:`Pipeline` behind ``cytofuse infer``.

``from fusion import Pipeline`` is resolved lazily so importing the package (e.g. for the CLI's
``--help``) does not load pandas-heavy modules or MindSpore.
"""
from __future__ import annotations

from typing import Any

__all__ = ["Pipeline", "DetectionSystem", "ImageResult", "FusionRule"]


def __getattr__(name: str) -> Any:
    if name in ("Pipeline", "DetectionSystem", "ImageResult"):
        from . import pipeline

        return getattr(pipeline, name)
    if name == "FusionRule":
        from .rules import FusionRule

        return FusionRule
    raise AttributeError(f"module 'fusion' has no attribute {name!r}")
