"""Skip the network on tiles that are one flat colour: the empty glass of a tissue-masked slide.

A whole slide is mostly glass. :class:`cytocore.slides.LazyRGB` returns glass (outside the tissue
mask) as one constant colour, so a tile that lies entirely on glass is constant in every channel.
:class:`BlankTileSkipper` wraps the network function of :func:`segmentation.network.model_info`: the
tiles of a batch that are constant get logits meaning "background, no instance" (probability ~0 after
the sigmoid/softmax) without a forward pass; the others go through the network, the batch padded to
a power of two (as ``predict.pad_batch`` does) so a graph-mode network compiles few shapes.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np

#: Logit magnitude for "certainly background": sigmoid(-20) ≈ 2e-9.
CERTAIN = 20.0


class BlankTileSkipper:
    """``fn(batch) -> logits`` that leaves constant tiles out of the network call."""

    def __init__(self, fn: Callable[[np.ndarray], np.ndarray], instance_channels: int = 0, max_batch: int = 8) -> None:
        self.fn = fn
        self.instance_channels = int(instance_channels)
        self.max_batch = max(1, int(max_batch))
        self.channels: Optional[int] = None
        self.tiles_run = 0
        self.tiles_skipped = 0

    def _blank_logits(self, n: int, h: int, w: int) -> np.ndarray:
        assert self.channels is not None
        out = np.full((n, self.channels, h, w), -CERTAIN, np.float32)
        semantic = self.channels - self.instance_channels
        if semantic > 1:  # softmax over background + classes: background (channel 0) wins
            out[:, 0] = CERTAIN
        return out

    def _run(self, batch: np.ndarray) -> np.ndarray:
        from .predict import padded_batch_size

        n = len(batch)
        size = padded_batch_size(n, max(self.max_batch, n), "pow2")
        if size > n:
            batch = np.concatenate([batch, np.zeros((size - n,) + batch.shape[1:], batch.dtype)])
        logits = np.asarray(self.fn(batch), np.float32)[:n]
        self.channels = int(logits.shape[1])
        self.tiles_run += n
        return logits

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        n, c, h, w = batch.shape
        flat = batch.reshape(n, c, -1)
        blank = (flat.max(axis=2) == flat.min(axis=2)).all(axis=1)
        if not blank.any():
            return self._run(batch)
        if self.channels is None:  # the output's channel count is learnt from one real call
            self._run(batch[:1])
        keep = np.flatnonzero(~blank)
        out = self._blank_logits(n, h, w)
        if len(keep):
            out[keep] = self._run(batch[keep])
        self.tiles_skipped += int(blank.sum())
        return out
