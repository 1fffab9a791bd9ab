"""An exponential moving average of a network's weights (Polyak averaging), for the train loop.

Why: on small data the weights of the last steps jump from one epoch to the next. LC25000's
held-out balanced accuracy moved between 0.86 and 0.93 over the last ten epochs of one run, so
"the final weights" (or the best epoch on a 16-image validation set) is partly a draw. The
average of the recent weights sits in the middle of that wobble; it is what mindcv's and timm's
``ema`` options keep for the same reason. The average is taken on the host in NumPy after each
step (a few milliseconds for our networks), so the compiled step stays the same with or without it.
Weights are swapped in place (``ops.assign``, as :func:`cytocore.distributed.average_buffers` does):
``set_data`` after the step was compiled gives the parameter new memory that the compiled step no
longer updates (training silently stops).

Only trainable weights are averaged; batch-norm statistics are already running averages and are
taken from the network as they are.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Optional

import numpy as np

from . import runtime
from .errors import CheckpointError

#: Prefix of the raw (not averaged) weights in ``last.ckpt``: training resumes from them.
RAW_PREFIX = "ema_raw."


class WeightAverage:
    """``decay``-weighted running average of ``network``'s trainable weights.

    The effective decay starts low, ``min(decay, (1 + t) / (10 + t))`` after ``t`` updates, so the
    first steps' random weights fade out instead of dominating a short run's average.
    """

    def __init__(self, network: Any, decay: float, updates: int = 0,
                 averaged: Optional[list[np.ndarray]] = None) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema must be between 0 and 1 (a per-step decay such as 0.99), got {decay}")
        self.decay = float(decay)
        self.updates = int(updates)
        self.params = list(network.trainable_params())
        self.shadow = ([np.array(a, np.float32) for a in averaged] if averaged is not None
                       else [p.asnumpy().astype(np.float32, copy=True) for p in self.params])

    def update(self) -> None:
        """Fold the network's current weights into the average (call after each optimiser step)."""
        d = min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))
        for avg, p in zip(self.shadow, self.params):
            avg *= d
            avg += (1.0 - d) * p.asnumpy().astype(np.float32, copy=False)
        self.updates += 1

    def _set(self, values: list[np.ndarray]) -> None:
        import mindspore as ms
        import mindspore.ops as ops

        for p, v in zip(self.params, values):  # in place: set_data would detach the compiled step from p
            ops.assign(p, ms.Tensor(v, dtype=p.dtype))

    @contextmanager
    def applied(self) -> Iterator[list[np.ndarray]]:
        """The network holds the averaged weights inside the block; yields the raw ones it gets back after."""
        raw = [p.asnumpy().copy() for p in self.params]
        self._set(self.shadow)
        try:
            yield raw
        finally:
            self._set(raw)

    def apply_for_good(self) -> None:
        """Leave the averaged weights in the network (the end of training)."""
        self._set(self.shadow)


def restore_raw(network: Any, saved: dict, path: Any = "<checkpoint>") -> Optional[list[np.ndarray]]:
    """After ``last.ckpt`` was loaded into ``network`` (averaged weights under the network's names), put
    the raw weights saved beside them back; returns the averaged ones, or None if there were no raw ones."""
    raw = {name[len(RAW_PREFIX):]: value for name, value in saved.items() if name.startswith(RAW_PREFIX)}
    if not raw:
        return None
    params = list(network.trainable_params())
    absent = [p.name for p in params if p.name not in raw]
    if absent:
        raise CheckpointError(f"{path}: raw weights of the weight average are incomplete (missing {', '.join(absent[:3])})")
    averaged = [p.asnumpy().astype(np.float32, copy=True) for p in params]
    runtime.load_into(network, raw, path, strict=False)  # before the step is compiled: set_data is safe here
    return averaged


class RawWeights:
    """The raw weights as a pseudo-cell for ``runtime.save_checkpoint`` (it reads ``parameters_and_names``)."""

    def __init__(self, params: list[Any], values: list[np.ndarray]) -> None:
        self.items = list(zip(params, values))

    def parameters_and_names(self) -> Iterator[tuple[str, Any]]:
        import mindspore as ms

        for p, v in self.items:
            name = RAW_PREFIX + p.name
            yield name, ms.Parameter(ms.Tensor(v), name=name, requires_grad=False)
