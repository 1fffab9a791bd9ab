"""Per-crop attribution: Grad-CAM heat maps of which part of a crop drove a class score.

Grad-CAM weights each channel of a feature map by the mean gradient of the class logit with respect
to it and keeps the positive part of the weighted sum: a map of where the evidence for that class
lies, at the feature map's resolution, upsampled to the crop. The same maps seed weak supervision
later (CAM pseudo-masks inside boxes), so the computation is exact (the gradient of the logit, not
of the probability, as in the paper; batch-norm in inference mode, so crops of a batch do not
influence each other) and batched through one compiled graph.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence, Union

import cv2
import numpy as np

from cytocore.imageio import write_png
from cytocore.preprocess import to_network_input

from .model import cam_split

PathLike = Union[str, Path]


def _cam_function(classifier: Any, stride: Optional[int]):
    """A compiled ``(inputs, one-hot class weights) → (feature map, d score / d map)``, cached per classifier."""
    cache = classifier.__dict__.setdefault("_cam_functions", {})
    if stride in cache:
        return cache[stride]
    import mindspore as ms

    prefix, head_from_map, _ = cam_split(classifier.network, stride)

    def feature_map(x):
        for cell in prefix:
            x = cell(x)
        return x

    def class_score(fm, weights):
        return (head_from_map(fm) * weights).sum()

    grad = ms.grad(class_score, grad_position=0)

    @ms.jit
    def run(x, weights):
        fm = feature_map(x)
        return fm, grad(fm, weights)

    cache[stride] = run
    return run


def gradcam(
    classifier: Any,
    crops: np.ndarray,
    class_index: Union[int, Sequence[int], np.ndarray],
    stride: Optional[int] = None,
    batch_size: int = 32,
) -> np.ndarray:
    """Grad-CAM maps ``(N, h, w)`` float32 in [0, 1] of uint8 crops ``(N, h, w, 3)``.

    ``class_index`` is one class for all crops or one per crop (e.g. each crop's top class).
    ``stride`` picks the feature map: None = the last (coarsest, most class-specific), 16 or 8 = an
    earlier, finer one. Each map is scaled so its maximum is 1; a crop with no positive evidence
    for the class gets an all-zero map.
    """
    import mindspore as ms

    crops = np.asarray(crops)
    if crops.ndim != 4 or crops.shape[-1] != 3:
        raise ValueError(f"expected (N, H, W, 3) crops, got shape {crops.shape}")
    n, h, w = crops.shape[:3]
    k = classifier.num_classes
    index = np.broadcast_to(np.asarray(class_index, np.int64), (n,))
    if n and (index.min() < 0 or index.max() >= k):
        raise ValueError(f"class index out of range 0..{k - 1}: {sorted(set(index.tolist()))}")
    out = np.zeros((n, h, w), np.float32)
    if n == 0:
        return out
    run = _cam_function(classifier, stride)
    classifier.network.set_train(False)
    batch_size = max(1, int(batch_size))
    for start in range(0, n, batch_size):
        x = to_network_input(crops[start:start + batch_size])
        m = len(x)
        weights = np.zeros((batch_size, k), np.float32)
        weights[np.arange(m), index[start:start + m]] = 1.0
        if m < batch_size:  # one compiled shape for every batch
            x = np.concatenate([x, np.zeros((batch_size - m,) + x.shape[1:], np.float32)])
        fm, grads = run(ms.Tensor(x), ms.Tensor(weights))
        out[start:start + m] = cams_from(fm.asnumpy()[:m], grads.asnumpy()[:m], (h, w))
    return out


def cams_from(feature_map: np.ndarray, grads: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Grad-CAM from a feature map ``(N, C, h, w)`` and its gradient: weighted sum, ReLU, upsample, scale to [0, 1]."""
    alpha = grads.mean(axis=(2, 3), keepdims=True)
    cam = np.maximum((alpha * feature_map).sum(axis=1), 0.0)
    out = np.empty((len(cam), size[0], size[1]), np.float32)
    for i, c in enumerate(cam):
        up = cv2.resize(c.astype(np.float32), (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
        top = float(up.max())
        out[i] = np.clip(up / top, 0.0, 1.0) if top > 0 else 0.0
    return out


def heatmap_overlay(crop: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """The crop with the map blended on top in the 'jet' colours (red = strongest evidence)."""
    from matplotlib import colormaps

    colours = colormaps["jet"](np.clip(cam, 0, 1))[..., :3] * 255.0
    return np.clip((1 - alpha) * crop.astype(np.float32) + alpha * colours, 0, 255).astype(np.uint8)


def save_heatmap(path: PathLike, crop: np.ndarray, cam: np.ndarray) -> None:
    """Write the crop and its overlay side by side as one PNG (atomically)."""
    write_png(path, np.concatenate([crop, heatmap_overlay(crop, cam)], axis=1))
