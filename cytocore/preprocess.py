"""Pixel normalisation shared by every network, so a crop and a tile mean the same thing to both stages.

Pap-stained brushings are mostly pale background; centring on a fixed mean/std (ImageNet's, so
mindcv's pretrained EfficientNet weights see what they were trained on) keeps training stable
without per-data-set statistics that a user would have to recompute.
"""
from __future__ import annotations

import numpy as np

MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255.0
STD = np.array([0.229, 0.224, 0.225], np.float32) * 255.0


def to_network_input(images: np.ndarray) -> np.ndarray:
    """uint8 ``(N, H, W, 3)`` or ``(H, W, 3)`` → float32 ``(N, 3, H, W)`` normalised."""
    arr = np.asarray(images)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"expected (N, H, W, 3) images, got shape {arr.shape}")
    out = (arr.astype(np.float32) - MEAN) / STD
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))
