"""What ``cytofuse infer`` reads: plain images and whole slides alike, each at the right scale.

* :func:`list_inputs` lists a folder's plain images and slides (``.svs``, ``.ndpi``, ``.mrxs``…).
* :class:`InputReader` opens one: a plain image is decoded as before; a slide becomes a
  :class:`cytocore.slides.LazyRGB` (level-0 pixels read region by region, glass outside the tissue
  mask never decoded), carrying its µm/px and a thumbnail for the overlay.
* :func:`scale_for` picks the U-Net's input scale for it (:func:`cytocore.mpp.resolve_scale`).

The tissue mask (``tissue.enabled``): ``auto`` masks slides only; ``true`` masks plain images too
(for big scans with much empty glass); ``false`` never.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Union

import numpy as np

from cytocore.errors import CytoFuseError
from cytocore.imageio import IMAGE_SUFFIXES, read_image
from cytocore.mpp import ScaleChoice, checkpoint_mpp, positive_mpp, resolve_scale
from cytocore.slides import (SLIDE_ONLY_SUFFIXES, LazyRGB, Slide, array_source, is_slide, slide_source,
                             thumbnail_downsample, thumbnail_of_array, tissue_from_thumbnail)

PathLike = Union[str, Path]
INPUT_SUFFIXES = tuple(IMAGE_SUFFIXES) + tuple(SLIDE_ONLY_SUFFIXES)

DEFAULT_TISSUE = {"enabled": "auto", "margin": 96, "max_grey": 235.0, "min_saturation": 0.08, "thumbnail_side": 2048}


def list_inputs(folder: PathLike) -> list[Path]:
    """Plain images and slides directly in ``folder``, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CytoFuseError(f"{folder}: not a folder")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in INPUT_SUFFIXES)


def tissue_settings(config: Mapping[str, Any]) -> dict:
    user = dict(config.get("tissue") or {})
    unknown = sorted(set(user) - set(DEFAULT_TISSUE))
    if unknown:
        raise CytoFuseError(f"config tissue: unknown option(s) {', '.join(unknown)} (known: {', '.join(DEFAULT_TISSUE)})")
    out = {**DEFAULT_TISSUE, **user}
    if out["enabled"] not in ("auto", True, False):
        raise CytoFuseError(f"config tissue.enabled: auto, true or false, not {out['enabled']!r}")
    return out


class InputReader:
    """Reads one input for inference: ``read(path)`` → RGB uint8 array, or a :class:`LazyRGB` for a slide."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.channel_order = str(config.get("channel_order", "RGB"))
        self.max_pixels = config.get("max_pixels")
        self.tissue = tissue_settings(config)

    def _mask(self, thumb: np.ndarray, downsample: int) -> Any:
        t = self.tissue
        return tissue_from_thumbnail(thumb, downsample, int(t["margin"]), float(t["max_grey"]), float(t["min_saturation"]))

    def read(self, path: PathLike) -> Union[np.ndarray, LazyRGB]:
        path = Path(path)
        if is_slide(path):
            slide = Slide(path)
            pixels = slide.width * slide.height
            if self.max_pixels is not None and pixels > int(self.max_pixels):
                raise CytoFuseError(
                    f"{path}: slide of {slide.width}x{slide.height} px is over max_pixels={int(self.max_pixels)}: its "
                    "probability and label planes (5 bytes per level-0 pixel) would not fit; raise max_pixels "
                    "(--set max_pixels=N) if the memory is there")
            d = thumbnail_downsample(slide.width, slide.height, int(self.tissue["thumbnail_side"]))
            thumb = slide.thumbnail(d)
            mask = self._mask(thumb, d) if self.tissue["enabled"] in ("auto", True) else None
            image = slide_source(slide, mask)
            image.mpp, image.is_slide, image.thumbnail, image.thumbnail_downsample = slide.mpp, True, thumb, d
            return image
        array = read_image(path, channel_order=self.channel_order, max_pixels=self.max_pixels)
        if self.tissue["enabled"] is True:
            d = thumbnail_downsample(array.shape[1], array.shape[0], int(self.tissue["thumbnail_side"]))  # as a slide
            image = array_source(array, self._mask(thumbnail_of_array(array, d), d), path.name)
            image.mpp, image.is_slide, image.thumbnail, image.thumbnail_downsample = None, False, None, d
            image.array = array
            return image
        return array


def input_mpp(image: Any) -> Optional[float]:
    return getattr(image, "mpp", None)


def scale_for(image: Any, segmenter: Any, predict: Mapping[str, Any], config: Mapping[str, Any], name: str) -> ScaleChoice:
    """The U-Net input scale for one input (rules: :mod:`cytocore.mpp`).

    ``predict`` are the segmenter's resolved options (their ``scale``, when not the user's, is the
    checkpoint's own); ``config`` the fusion config: ``mpp`` (``--mpp``) and a user-chosen ``scale``
    (``--scale``) or ``segmentation.predict.scale``.
    """
    user_scale = config.get("scale")
    if user_scale is None:
        user_scale = ((config.get("segmentation") or {}).get("predict") or {}).get("scale")
    user_mpp = positive_mpp(config.get("mpp"), "--mpp")
    own = predict.get("scale")
    model_scale = float(own) if own is not None and user_scale is None else float(getattr(segmenter, "scale", 1.0) or 1.0)
    return resolve_scale(
        model_scale,
        checkpoint_mpp(getattr(segmenter, "meta", None)),
        user_mpp if user_mpp is not None else input_mpp(image),
        user_scale=None if user_scale is None else float(user_scale),
        is_slide=bool(getattr(image, "is_slide", False)),
        name=name,
    )


def input_record(image: Any, choice: ScaleChoice) -> dict:
    """What ``parts/<id>.json`` and ``run.json`` say about one input: slide or not, µm/px, scale, tissue."""
    tissue = getattr(image, "tissue", None)
    return {
        "slide": bool(getattr(image, "is_slide", False)),
        "mpp": choice.input_mpp,
        "scale": choice.to_dict(),
        "tissue_fraction": None if tissue is None else round(tissue.fraction, 4),
    }


def segmentation_model_for(image: Any, segmenter: Any, predict: Mapping[str, Any], choice: ScaleChoice) -> tuple[Any, dict]:
    """The model and predict options for one input: its scale, and glass tiles skipped when it has a tissue mask.

    Returns ``(model, predict)`` for :func:`segmentation.predict.segment_image`: the segmenter
    itself, or a :class:`~segmentation.network.ModelInfo` whose network function skips constant tiles.
    """
    import dataclasses

    from segmentation.blank_tiles import BlankTileSkipper
    from segmentation.network import model_info

    options = {**dict(predict), "scale": choice.scale}
    if getattr(image, "tissue", None) is None:
        return segmenter, options
    info = model_info(segmenter)
    skipper = BlankTileSkipper(info.fn, int(getattr(info, "instance_channels", 0) or 0), int(options.get("batch_size", 8)))
    return dataclasses.replace(info, fn=skipper), options
