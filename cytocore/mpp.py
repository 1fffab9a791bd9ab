"""Microns per pixel: what the models were trained at, what an input is at, and the scale that follows.

A U-Net learns cells of a given size in pixels. A model trained on 0.25 µm/px images (40×) sees a
0.5 µm/px slide (20×) as cells half the size it knows, so the input must be resized by
``0.5 / 0.25 = 2`` on top of the model's own ``scale``. The training data's µm/px is stored in each
checkpoint (``meta["mpp"]``, from the data set's ``metadata.csv`` ``mpp`` column or the config's
``data.mpp``); the input's comes from the slide's own properties or ``--mpp``.

How the scale of one input is chosen (:func:`resolve_scale`):

1. an explicit scale (``--scale``, or ``segmentation.predict.scale`` in the config) is used as is;
2. input µm/px (``--mpp``, else the slide's) and training µm/px both known: the physical scale;
3. input µm/px known but the checkpoint has none: refused, the ratio cannot be formed;
4. input µm/px unknown: a whole slide is refused (neither is known for it, and slides come at every
   magnification); a plain image (PNG, JPEG, BMP, one-level TIFF: formats without a dependable
   µm/px) is taken to be at the training magnification, and the run record says so.

Classification is unaffected: its crops are the box plus a margin resized to a fixed size.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from .errors import CytoFuseError

log = logging.getLogger("cytofuse")

PathLike = Union[str, Path]


@dataclass
class ScaleChoice:
    """The resize factor before the U-Net for one input, and why."""

    scale: float
    reason: str
    input_mpp: Optional[float] = None
    train_mpp: Optional[float] = None

    def to_dict(self) -> dict:
        return {"scale": round(self.scale, 6), "reason": self.reason, "input_mpp": self.input_mpp,
                "train_mpp": self.train_mpp}


def positive_mpp(value: Any, where: str) -> Optional[float]:
    """A µm/px value as float (None stays None); anything not a positive finite number is a one-line error."""
    if value is None:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise CytoFuseError(f"{where}: µm per pixel must be a number, not {value!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise CytoFuseError(f"{where}: µm per pixel must be positive, not {value!r}")
    return v


def checkpoint_mpp(meta: Optional[Mapping[str, Any]]) -> Optional[float]:
    """The training µm/px a checkpoint records (None for checkpoints from before it was recorded)."""
    if not isinstance(meta, Mapping):
        return None
    value = meta.get("mpp")
    if value is None:
        data = ((meta.get("config") or {}).get("data") or {}) if isinstance(meta.get("config"), Mapping) else {}
        value = data.get("mpp") if isinstance(data, Mapping) else None
    try:
        return positive_mpp(value, "checkpoint")
    except CytoFuseError:
        return None


def dataset_mpp(root: Optional[PathLike]) -> Optional[float]:
    """The µm/px of a data set from its ``metadata.csv`` ``mpp`` column (one value; mixed values refused)."""
    if root is None:
        return None
    path = Path(root) / "metadata.csv"
    if not path.is_file():
        return None
    import pandas as pd

    try:
        header = pd.read_csv(path, nrows=0).columns
    except (OSError, ValueError):
        return None
    cols = {c.lower(): c for c in header}
    if "mpp" not in cols:
        return None
    values = pd.to_numeric(pd.read_csv(path, usecols=[cols["mpp"]])[cols["mpp"]], errors="coerce").dropna()
    if values.empty:
        return None
    lo, hi = float(values.min()), float(values.max())
    if hi > lo * 1.01:
        raise CytoFuseError(f"{path}: column mpp holds different values ({lo:g} to {hi:g}); a model is trained at "
                            "one magnification: resample the images or set data.mpp and data.scale yourself")
    return positive_mpp(float(values.median()), str(path))


def training_mpp(config_mpp: Any, data_root: Optional[PathLike]) -> Optional[float]:
    """What a training run records: the config's ``data.mpp`` wins over the data set's metadata."""
    value = positive_mpp(config_mpp, "config data.mpp")
    return value if value is not None else dataset_mpp(data_root)


def resolve_scale(
    model_scale: float,
    train_mpp: Optional[float],
    input_mpp: Optional[float],
    *,
    user_scale: Optional[float] = None,
    is_slide: bool = False,
    name: str = "input",
    checkpoint: str = "segmentation checkpoint",
) -> ScaleChoice:
    """The U-Net's input scale for one image or slide (rules in the module docstring)."""
    if user_scale is not None:
        return ScaleChoice(float(user_scale), "chosen by the user (--scale)", input_mpp, train_mpp)
    if input_mpp is not None and train_mpp is not None:
        scale = float(model_scale) * float(input_mpp) / float(train_mpp)
        return ScaleChoice(scale, f"{input_mpp:g} µm/px input, model trained at {train_mpp:g} µm/px", input_mpp, train_mpp)
    if input_mpp is not None:
        raise CytoFuseError(
            f"{name}: is at {input_mpp:g} µm/px but {checkpoint} records no training µm/px, so the two cannot be "
            "matched; pass --scale S (resize factor before the U-Net) or retrain with data.mpp set"
        )
    if is_slide:
        known = f"the model was trained at {train_mpp:g} µm/px" if train_mpp is not None else "the model's training µm/px is not recorded either"
        raise CytoFuseError(
            f"{name}: the slide has no µm per pixel in its metadata and no --mpp was given ({known}); "
            "pass --mpp (e.g. --mpp 0.25 for 40x, 0.5 for 20x) or --scale S"
        )
    reason = ("plain image without µm/px: taken to be at the training magnification"
              + (f" ({train_mpp:g} µm/px)" if train_mpp is not None else ""))
    return ScaleChoice(float(model_scale), reason, None, train_mpp)
