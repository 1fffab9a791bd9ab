"""The segmentation stage's proposals on the training images, for training the classifier on them.

``cytofuse compare`` with ``cls_proposals: true`` runs the freshly trained U-Net over the training
split with the very segmentation settings inference will use (the ``infer.segmentation`` block, with
``proposals_infer`` over it when a config sets one: hypotheses offered at inference that the classifier
should not learn from), so
the classifier learns from the merged cells, fragments and look-alikes it will be shown at test
time (see ``classification/proposals.py`` for how they are labelled). The result is the same
``instances.csv`` that ``cytofuse seg predict`` writes, so the step is resumable and inspectable.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Union

from cytocore.records import Dataset

PathLike = Union[str, Path]


def training_proposals(seg_checkpoint: PathLike, dataset: Dataset, split: str, infer_cfg: Mapping[str, Any],
                       out_dir: PathLike, progress: bool = True) -> Path:
    """Segment the ``split`` images into ``out_dir`` (resumable); returns ``out_dir/instances.csv``."""
    from fusion.sources import two_stage_postprocess
    from segmentation.predict import predict_folder

    from .runkit import link_split_images

    out = Path(out_dir)
    images = link_split_images(dataset, split, out / "images")
    seg = dict(infer_cfg.get("segmentation") or {})
    predict_folder(seg_checkpoint, images, out, seg.get("predict") or None, two_stage_postprocess(seg.get("postprocess")),
                   progress=progress, max_pixels=infer_cfg.get("max_pixels"))
    return out / "instances.csv"
