"""From probability maps to cell instances and boxes (the segmentation stage's detections).

Cells in brushings touch and pile up, so a thresholded map merges neighbours into one blob; the
standard remedy (used here) is a watershed on the distance transform, seeded at one marker per
cell centre. Everything is scikit-image/SciPy; this module only chooses the order and parameters:

1. foreground = probability ≥ ``threshold``;
2. fill holes up to ``max_hole_area`` pixels (pale nuclei and vacuoles lower the probability inside
   a cell; large enclosed background between a ring of cells must stay background);
3. drop components smaller than ``min_area`` (debris, noise);
4. split touching cells: Euclidean distance transform, smoothed by ``smooth_sigma``; markers from
   ``peak_local_max`` (``min_distance`` ≈ the smallest cell radius, optional ``footprint``) or
   ``h_maxima`` (centres at least ``h`` pixels of distance higher than the saddle between them);
   every component gets at least one marker; watershed of the negated distance inside the mask;
5. drop split fragments smaller than ``min_area``;
6. one row per instance: pixel box, area, mean and max probability inside (the seg score).

With an **instance head** (the U-Net's extra channel, :mod:`segmentation.instance_targets`: each
cell's normalised distance to its own border, 1 at its centre, 0 where cells touch) step 4 uses it
instead of the mask's distance transform, which cannot see the border between two touching cells:
markers are the connected *cores* where the head is ``>= marker_threshold`` (``markers: head_core``,
the default with a head) or its peaks (``head_peaks``: ``peak_local_max`` with ``min_distance`` and
``threshold_abs = marker_threshold``), grown by a watershed of the negated head map inside the
foreground. A component with no marker stays one instance. The defaults are a starting point:
``cytofuse seg train`` chooses ``threshold``, ``marker_threshold``, ``min_distance`` and ``min_area``
on the validation split by the challenge's FROC and stores them in the checkpoint.

**Several hypotheses.** One marker spacing cannot fit cells of very different sizes (in blood
smears a platelet is a quarter of a red cell's width, a white cell twice it): a spacing that splits
two touching red cells cuts a white cell in pieces, one that keeps white cells whole merges a
platelet into its neighbour. ``hypotheses`` lists further settings (each a few keys over the main
ones); every one is run on the same maps and its objects are added to the table as extra candidate
boxes, so the classifier and the fusion rule, not one global parameter, decide which reading of a
cluster is right, and NMS keeps the best. Rows of a hypothesis have ``label_id`` 0: the label plane
holds the main setting's instances only (one pixel belongs to one cell there); a box that the main
setting already produced is not repeated. On BCCD's 87 val images (the 485171d U-Net, main spacing
40 px) adding spacings 20 and 80 px raised the share of annotated cells with a box at IoU > 0.5 from
0.27 / 0.65 / 0.77 (platelets / red / white cells) to 0.48 / 0.78 / 0.91.
With K+1 class maps a hypothesis may also switch ``multiclass``: the two-stage system reads such a
U-Net by its whole foreground, and ``{multiclass: per_class}`` adds the class-pure objects, which keep
a platelet apart from the red cell it touches (BCCD val, the 8313f4b run's K+1 U-Net and classifier,
fitted rule cross-fitted on val: mean AP50 0.815 without such hypotheses, 0.839 with two).

**Overlapping round cells.** Red cells in a smear (and nuclei in a pile) overlap, not just touch: the
watershed gives the shared part to one cell, so the other comes out as a crescent whose box is a
fraction of the cell an annotator boxes whole (BCCD val, the 24 + 12 min run: half of the red cells no
candidate hit at IoU > 0.5 overlap another annotated cell). ``box_shape: disc`` boxes each object by
the largest disc inside it, grown to that disc's full size (:func:`disc_boxes`); as a hypothesis it adds
each cell's whole disc beside the watershed's pieces, and the classifier and fusion rule choose (BCCD
val, per-class discs: mean AP50 0.815 -> 0.834). A pixel still belongs to one object: only boxes change.

Boxes are ``x0, y0, x1, y1`` in pixels with exclusive ends (pixel edges): a one-pixel object at
column 5, row 7 has the box ``(5, 7, 6, 8)``, so ``x1 / width`` is the normalised ``xmax``.

Maps larger than ``block_size`` are processed block by block with ``block_margin`` pixels of
context on every side; an object is kept only by the block whose core holds its centroid, so each
object is reported exactly once, with the same box as whole-image processing, as long as the
margin exceeds the largest cell (a warning says when an object reached a block's context edge).
"""
from __future__ import annotations

import copy
import inspect
import logging
from typing import Callable, Optional, Sequence

import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from skimage import feature, morphology, segmentation

from cytocore.config import merge
from cytocore.errors import CytoFuseError
from cytocore.planes import release

log = logging.getLogger("cytofuse")

#: Post-processing parameters and their defaults (the ``postprocess:`` block of a YAML config).
DEFAULT_POSTPROCESS: dict = {
    "threshold": 0.5,  # foreground where probability >= threshold
    "max_hole_area": 200,  # fill enclosed holes of up to this many pixels; null = fill every hole
    "min_area": 30,  # objects (and split fragments) with fewer pixels are dropped
    "split": "watershed",  # watershed | none
    "markers": "auto",  # auto (head_core with an instance head, else peak_local_max) | head_core | head_peaks
    #                     | peak_local_max | h_maxima (the last two: on the mask's distance transform)
    "marker_threshold": 0.5,  # instance head: cores / peaks where the head is >= this
    "min_distance": 7,  # peak_local_max: min px between two centres (~ smallest cell radius)
    "footprint": None,  # peak_local_max: side of the square neighbourhood (px); null = from min_distance
    "h": 2.0,  # h_maxima: a centre must rise this many px of distance above its saddle
    "smooth_sigma": 1.0,  # Gaussian sigma on the distance map before finding centres; 0 = none
    "connectivity": 1,  # 1 = 4-neighbours, 2 = 8-neighbours (components, holes, watershed)
    "block_size": 1024,  # maps larger than this are processed in blocks of this size (px): memory per block ...
    "block_margin": 128,  # ... with this much context on each side: > the largest cell diameter
    "box_shape": "region",  # region: each object's own box | disc: the box of its inscribed disc, grown to the
    #                        disc's full size (overlapping round cells, see "Overlapping round cells" above)
    "multiclass": "per_class",  # K+1 maps: per_class components, or foreground components + class means
    "hypotheses": [],  # extra settings run beside this one (e.g. [{min_distance: 20}, {min_distance: 80}]):
    #                    their objects are added as further candidate boxes (see "Several hypotheses" above)
}

#: Keys a hypothesis may change: how one image is cut into objects, not how it is processed in blocks.
HYPOTHESIS_KEYS = ("threshold", "max_hole_area", "min_area", "split", "markers", "marker_threshold", "min_distance",
                   "footprint", "h", "smooth_sigma", "multiclass", "box_shape")
BOX_SHAPES = ("region", "disc")

#: Options added after runs were made, at the value that reproduces the older output: a settings record
#: leaves them out at that value (:func:`identity_settings`), so a finished run stays resumable.
LATER_DEFAULTS: dict = {"box_shape": "region"}


def identity_settings(cfg: dict) -> dict:
    """``cfg`` without the :data:`LATER_DEFAULTS` keys at their old-behaviour value: what a run's
    fingerprint and ``run.json`` record."""
    return {k: v for k, v in cfg.items() if not (k in LATER_DEFAULTS and v == LATER_DEFAULTS[k])}


#: Post-processing values ``cytofuse seg train`` chooses on the validation split by FROC, in the
#: order the coordinate search tries them (the marker kind first: the others depend on it).
TUNED_KEYS = ("markers", "threshold", "marker_threshold", "min_distance", "min_area")

MARKERS = ("auto", "head_core", "head_peaks", "peak_local_max", "h_maxima")


def encode_tuned(key: str, value: object) -> float:
    """A tuned value as the float a checkpoint's metrics hold (a marker kind by its index in ``MARKERS``)."""
    return float(MARKERS.index(str(value))) if key == "markers" else float(value)  # type: ignore[arg-type]


def decode_tuned(key: str, value: float) -> object:
    """The inverse of :func:`encode_tuned`, with pixel counts as integers."""
    if key == "markers":
        return MARKERS[int(round(value))]
    return int(round(value)) if key in ("min_area", "min_distance") else float(value)


def concrete_markers(kind: str, has_head: bool) -> str:
    """``auto`` resolved: head cores with an instance head, else peaks of the mask's distance transform."""
    if kind == "auto":
        return "head_core" if has_head else "peak_local_max"
    return kind

#: Columns of an instance table, in order.
INSTANCE_COLUMNS = ["x0", "y0", "x1", "y1", "area", "seg_mean", "seg_max", "label_id"]


def postprocess_config(cfg: Optional[dict] = None) -> dict:
    """Defaults overlaid with ``cfg``; an unknown key is an error naming it (typos cost hours)."""
    out = merge(DEFAULT_POSTPROCESS, dict(cfg or {}), "postprocess config") if cfg else copy.deepcopy(DEFAULT_POSTPROCESS)
    if out["split"] not in ("watershed", "none"):
        raise CytoFuseError(f"postprocess config: split must be 'watershed' or 'none', not {out['split']!r}")
    if out["markers"] not in MARKERS:
        raise CytoFuseError(f"postprocess config: markers must be one of {', '.join(MARKERS)}, not {out['markers']!r}")
    if out["box_shape"] not in BOX_SHAPES:
        raise CytoFuseError(f"postprocess config: box_shape must be one of {', '.join(BOX_SHAPES)}, not {out['box_shape']!r}")
    if out["multiclass"] not in ("per_class", "foreground"):
        raise CytoFuseError(f"postprocess config: multiclass must be 'per_class' or 'foreground', not {out['multiclass']!r}")
    hypotheses = out["hypotheses"] if out["hypotheses"] is not None else []
    if not isinstance(hypotheses, (list, tuple)):
        raise CytoFuseError(f"postprocess config: hypotheses must be a list of settings, not {hypotheses!r}")
    for i, extra in enumerate(hypotheses):
        if not isinstance(extra, dict) or not extra:
            raise CytoFuseError(f"postprocess config: hypotheses[{i}] must be a mapping such as {{min_distance: 20}}, "
                                f"not {extra!r}")
        unknown = sorted(set(extra) - set(HYPOTHESIS_KEYS))
        if unknown:
            raise CytoFuseError(f"postprocess config: hypotheses[{i}] sets {', '.join(map(str, unknown))}; a hypothesis "
                                f"may set {', '.join(HYPOTHESIS_KEYS)}")
    out["hypotheses"] = [dict(extra) for extra in hypotheses]
    for setting in hypothesis_configs(out):  # a hypothesis's values are checked like the main ones
        postprocess_config(setting)
    return out


def hypothesis_configs(cfg: dict) -> list[dict]:
    """The full setting of each extra hypothesis: the main one with the hypothesis's keys over it."""
    return [{**cfg, **extra, "hypotheses": []} for extra in cfg.get("hypotheses") or []]


def with_hypotheses(main: pd.DataFrame, extras: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """The main table followed by each hypothesis's objects whose box is not already listed, ``label_id`` 0."""
    tables = [main]
    seen = {tuple(b) for b in main[["x0", "y0", "x1", "y1"]].to_numpy(np.int64)}
    for extra in extras:
        boxes = [tuple(b) for b in extra[["x0", "y0", "x1", "y1"]].to_numpy(np.int64)]
        new = np.array([b not in seen for b in boxes], bool)
        seen.update(boxes)
        if new.any():
            tables.append(extra[new].assign(label_id=0))
    if len(tables) == 1:
        return main
    return pd.concat(tables, ignore_index=True)


def as_probability(plane: np.ndarray) -> np.ndarray:
    """A stored probability plane (uint8 0..255, float16 or float32) as float32 in [0, 1]."""
    arr = np.asarray(plane)
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    return arr.astype(np.float32, copy=False)


# ------------------------------------------------------------------------------- skimage compatibility

def _size_keyword(func: Callable) -> str:
    """scikit-image 0.26 renamed the size arguments (with ``<=`` semantics); older versions use ``<``."""
    return "max_size" if "max_size" in inspect.signature(func).parameters else "legacy"


def _remove_small_objects(mask: np.ndarray, min_area: int, connectivity: int) -> np.ndarray:
    if min_area <= 1:
        return mask
    if _size_keyword(morphology.remove_small_objects) == "max_size":
        return morphology.remove_small_objects(mask, max_size=min_area - 1, connectivity=connectivity)
    return morphology.remove_small_objects(mask, min_size=min_area, connectivity=connectivity)


def _remove_small_labels(labels: np.ndarray, min_area: int) -> np.ndarray:
    """Drop labelled regions with fewer than ``min_area`` pixels (labels stay as they are)."""
    sizes = np.bincount(labels.ravel())
    small = sizes < min_area
    small[0] = False
    if small.any():
        labels = np.where(small[labels], 0, labels)
    return labels


def _fill_holes(mask: np.ndarray, max_hole_area: Optional[int], connectivity: int) -> np.ndarray:
    """Fill enclosed background regions of at most ``max_hole_area`` pixels (``None``: all of them).

    Only background *enclosed* by foreground is a hole: regions touching the image edge never are
    (``remove_small_holes`` would fill a small gap between a cell and the edge, and then whether a
    gap is filled would depend on where a block boundary falls).
    """
    filled = ndi.binary_fill_holes(mask, structure=ndi.generate_binary_structure(2, 3 - connectivity))
    if max_hole_area is None:
        return filled
    holes, n = ndi.label(filled & ~mask, structure=ndi.generate_binary_structure(2, 3 - connectivity))
    if n == 0:
        return mask
    small = np.bincount(holes.ravel()) <= int(max_hole_area)
    small[0] = False
    return mask | small[holes]


# ------------------------------------------------------------------------------------ mask → labels

def _markers(distance: np.ndarray, components: np.ndarray, cfg: dict, kind: str) -> np.ndarray:
    """One labelled marker per presumed cell centre, and at least one per component."""
    conn8 = ndi.generate_binary_structure(2, 2)
    if kind == "head_core":
        markers, n = ndi.label((distance >= float(cfg["marker_threshold"])) & (components > 0), structure=conn8)
    else:
        if kind == "h_maxima":
            peaks = morphology.h_maxima(distance, float(cfg["h"])).astype(bool) & (components > 0)
        else:
            side = cfg["footprint"]
            footprint = np.ones((int(side), int(side)), bool) if side else None
            floor = float(cfg["marker_threshold"]) if kind == "head_peaks" else None
            coords = feature.peak_local_max(
                distance, min_distance=max(1, int(cfg["min_distance"])), footprint=footprint, labels=components,
                exclude_border=False, threshold_abs=floor,
            )
            peaks = np.zeros(distance.shape, bool)
            peaks[tuple(coords.T)] = True
        markers, n = ndi.label(peaks, structure=conn8)
    present = np.unique(components[markers > 0])
    missing = np.setdiff1d(np.arange(1, components.max() + 1), present)
    if missing.size:
        for pos in ndi.maximum_position(distance, components, missing):
            n += 1
            markers[pos] = n
    return markers


def _marker_kind(cfg: dict, has_head: bool) -> str:
    kind = concrete_markers(cfg["markers"], has_head)
    if kind.startswith("head_") and not has_head:
        raise ValueError(f"postprocess markers {kind!r} need an instance head; this model has none "
                         "(use peak_local_max or h_maxima)")
    return kind


def label_mask(mask: np.ndarray, cfg: Optional[dict] = None, head: Optional[np.ndarray] = None) -> np.ndarray:
    """Binary foreground mask → instance label image (0 = background), steps 2–5 of the module doc.

    ``head`` is the instance head's map (same shape, [0, 1]); without it touching cells are split on
    the mask's own distance transform.
    """
    cfg = postprocess_config(cfg)
    conn = int(cfg["connectivity"])
    structure = ndi.generate_binary_structure(2, conn)
    mask = _fill_holes(np.asarray(mask, bool), cfg["max_hole_area"], conn)
    mask = _remove_small_objects(mask, int(cfg["min_area"]), conn)
    components, n = ndi.label(mask, structure=structure)
    if n == 0:
        return components.astype(np.int32)
    if cfg["split"] == "watershed":
        kind = _marker_kind(cfg, head is not None)
        if kind.startswith("head_"):
            distance = np.asarray(head, np.float32) * mask
        else:
            distance = ndi.distance_transform_edt(mask)
            if cfg["smooth_sigma"]:
                distance = ndi.gaussian_filter(distance, float(cfg["smooth_sigma"])) * mask
        markers = _markers(distance, components, cfg, kind)
        labels = segmentation.watershed(-distance, markers, mask=mask, connectivity=conn)
        labels = _remove_small_labels(labels, int(cfg["min_area"]))
    else:
        labels = components
    return segmentation.relabel_sequential(labels.astype(np.int32))[0]


def instances_from_labels(
    labels: np.ndarray, probability: np.ndarray, extra: Optional[dict[str, np.ndarray]] = None
) -> pd.DataFrame:
    """One row per label: box, area, mean/max probability, ``cx, cy`` centroid, and per-map means.

    ``extra`` maps column names to planes whose mean inside each instance becomes a column
    (the class probabilities of a multi-class model).
    """
    # SciPy's C loops rather than regionprops (a Python object per region): an untrained or noisy
    # head can give thousands of fragments per block, and validation runs this every epoch.
    labels = np.asarray(labels)
    slices = ndi.find_objects(labels)
    ids = np.asarray([i + 1 for i, sl in enumerate(slices) if sl is not None], np.int64)
    where = np.flatnonzero(labels)  # the sums run over object pixels only
    owner = labels.ravel()[where]
    n = len(slices) + 1
    area = np.bincount(owner, minlength=n)
    values = np.asarray(probability, np.float64).ravel()[where]
    peak = np.full(n, -np.inf)
    np.maximum.at(peak, owner, values)
    safe = np.maximum(area, 1)
    cy = np.bincount(owner, weights=where // labels.shape[1], minlength=n) / safe
    cx = np.bincount(owner, weights=where % labels.shape[1], minlength=n) / safe
    mean = np.bincount(owner, weights=values, minlength=n) / safe
    boxes = np.asarray([[sl[1].start, sl[0].start, sl[1].stop, sl[0].stop] for sl in slices if sl is not None],
                       np.int64).reshape(-1, 4)
    df = pd.DataFrame(
        {
            "x0": boxes[:, 0],
            "y0": boxes[:, 1],
            "x1": boxes[:, 2],
            "y1": boxes[:, 3],
            "area": area[ids].astype(np.int64),
            "seg_mean": mean[ids],
            "seg_max": peak[ids],
            "label_id": ids,
            "cx": cx[ids],
            "cy": cy[ids],
        }
    )
    for name, plane in (extra or {}).items():
        df[name] = np.asarray(ndi.mean(plane, labels, df["label_id"].to_numpy()), np.float64) if len(df) else []
    return df


def disc_boxes(table: pd.DataFrame, labels: np.ndarray) -> pd.DataFrame:
    """``table`` with each object's box replaced by the box of the largest disc inside it, grown to the
    disc's full size (clipped to the plane).

    Why: where round cells overlap (red cells in a smear, nuclei in a pile), the watershed hands the
    overlap to one cell, so the other comes out as a crescent whose box is a fraction of the cell's (or
    two cells stay one blob, whose disc is then the larger cell's); an annotator boxes each whole disc.
    The deepest point of the objects' distance transform is the centre of the cell whose disc holds it,
    and its depth that disc's radius even where a neighbour covers part of the disc (the cusps where the
    two outlines cross lie on both circles). A lone round cell keeps its own box to within a pixel.
    """
    if table.empty:
        return table
    ids = table["label_id"].to_numpy(np.int64)
    depth = ndi.distance_transform_edt(labels > 0)
    radius = np.asarray(ndi.maximum(depth, labels, ids), np.float64).reshape(-1)
    # The centre is the object's first pixel of greatest depth in row-major order, which a block and the
    # whole image agree on (ndi.maximum_position breaks ties by an unstable sort: a pixel apart between
    # them). Not the mean of those pixels: two equal cells left as one blob tie apart, and their mean
    # lies between the discs.
    deepest = np.zeros(int(labels.max()) + 1, np.float64)
    deepest[ids] = radius
    flat = np.flatnonzero((labels > 0) & (depth == deepest[labels]))
    owners, first = np.unique(labels.ravel()[flat], return_index=True)
    centres = np.column_stack(np.unravel_index(flat[first[np.searchsorted(owners, ids)]], labels.shape)).astype(np.float64)
    h, w = labels.shape
    # a pixel's depth is measured centre to centre: a disc of radius R pixel edges has depth R + 0.5
    out = table.copy()
    out["x0"] = np.clip(np.round(centres[:, 1] + 1.0 - radius), 0, w).astype(np.int64)
    out["y0"] = np.clip(np.round(centres[:, 0] + 1.0 - radius), 0, h).astype(np.int64)
    out["x1"] = np.clip(np.round(centres[:, 1] + radius), 0, w).astype(np.int64)
    out["y1"] = np.clip(np.round(centres[:, 0] + radius), 0, h).astype(np.int64)
    return out


def _boxes_of(table: pd.DataFrame, labels: np.ndarray, setting: dict) -> pd.DataFrame:
    """The reading's boxes: the objects' own, or their discs' (``box_shape``)."""
    return disc_boxes(table, labels) if setting["box_shape"] == "disc" else table


# ----------------------------------------------------------------------------------- block by block

def _empty_instances() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="float64" if c.startswith("seg_") else "int64") for c in INSTANCE_COLUMNS})


def _block_starts(length: int, block: int) -> range:
    return range(0, length, block)


Block = tuple[pd.DataFrame, np.ndarray]


def _write_labels(labels_out: np.ndarray, window: tuple[slice, slice], local: np.ndarray, local_ids: np.ndarray,
                  new_ids: np.ndarray) -> None:
    """Paint the kept objects of one block (local ids → provisional global ids); first writer wins."""
    lut = np.zeros(int(local.max()) + 1 if local.size else 1, np.int64)
    lut[local_ids] = new_ids
    painted = lut[local]
    target = labels_out[window]
    free = (painted > 0) & (target == 0)
    target[free] = painted[free]
    labels_out[window] = target
    release(labels_out)


def _renumber(labels_out: np.ndarray, lut: np.ndarray, rows: int = 256) -> None:
    """Map provisional ids to final ids in row strips (a memmap plane is never loaded whole).

    The table is cast to the plane's dtype first, so a strip costs its own size, not 64-bit copies.
    """
    lut = lut.astype(labels_out.dtype, copy=False) if np.issubdtype(labels_out.dtype, np.integer) else lut
    for a in range(0, labels_out.shape[0], rows):
        labels_out[a:a + rows] = lut[labels_out[a:a + rows]]
        release(labels_out)


def _blockwise(shape: Sequence[int], cfg: dict, process: Callable[[tuple[slice, slice]], Block],
               labels_out: Optional[np.ndarray] = None) -> pd.DataFrame:
    """Run ``process`` on overlapping blocks; keep each object in the block whose core holds its centroid.

    ``process`` returns the block's table and its local label image. With ``labels_out`` (an H×W
    integer array or memmap, zeros) each kept object is painted into it with its final ``label_id``;
    memory stays one block plus one strip.
    """
    h, w = int(shape[0]), int(shape[1])
    block, margin = max(1, int(cfg["block_size"])), max(0, int(cfg["block_margin"]))
    if labels_out is not None and tuple(labels_out.shape) != (h, w):
        raise ValueError(f"labels_out has shape {labels_out.shape}, expected {(h, w)}")
    parts: list[pd.DataFrame] = []
    truncated = 0
    next_id = 1
    for by in _block_starts(h, block):
        for bx in _block_starts(w, block):
            y0, y1 = max(0, by - margin), min(h, by + block + margin)
            x0, x1 = max(0, bx - margin), min(w, bx + block + margin)
            window = (slice(y0, y1), slice(x0, x1))
            df, local = process(window)
            if df.empty:
                continue
            for col in ("x0", "x1", "cx"):
                df[col] += x0
            for col in ("y0", "y1", "cy"):
                df[col] += y0
            keep = (df["cy"] >= by) & (df["cy"] < by + block) & (df["cx"] >= bx) & (df["cx"] < bx + block)
            df = df[keep].copy()
            cut = ((df["y0"] == y0) & (y0 > 0)) | ((df["x0"] == x0) & (x0 > 0)) | ((df["y1"] == y1) & (y1 < h)) | ((df["x1"] == x1) & (x1 < w))
            truncated += int(cut.sum())
            ids = np.arange(next_id, next_id + len(df), dtype=np.int64)
            next_id += len(df)
            if labels_out is not None and len(df):
                _write_labels(labels_out, window, local, df["label_id"].to_numpy(np.int64), ids)
            df["label_id"] = ids
            parts.append(df)
    if truncated:
        log.warning(
            "%d object(s) reached the edge of a post-processing block's context; their boxes may be cut: "
            "raise postprocess.block_margin above the largest cell diameter (now %d px)",
            truncated,
            margin,
        )
    parts = [df for df in parts if not df.empty]
    if not parts:
        return _empty_instances()
    out = pd.concat(parts, ignore_index=True)
    out = out.sort_values(["y0", "x0", "y1", "x1"], kind="mergesort").reset_index(drop=True)
    final = np.arange(1, len(out) + 1, dtype=np.int64)
    if labels_out is not None:
        lut = np.zeros(next_id, np.int64)
        lut[out["label_id"].to_numpy(np.int64)] = final
        _renumber(labels_out, lut)
    out["label_id"] = final
    return out.drop(columns=["cx", "cy"])


def distinct_readings(cfg: dict, ignored: Sequence[str] = ()) -> list[dict]:
    """The hypotheses whose reading can differ from the main setting's and from each earlier one's once
    the ``ignored`` keys (those the map at hand does not read) are set aside.

    A ``{multiclass: per_class}`` hypothesis on a binary map repeats the main reading: running it would
    cost a second watershed of every block and add nothing (each of its boxes is already listed).
    """
    def reading(setting: dict) -> dict:
        return {k: v for k, v in setting.items() if k not in ignored and k != "hypotheses"}

    seen = [reading(cfg)]
    out = []
    for setting in hypothesis_configs(cfg):
        if reading(setting) not in seen:
            seen.append(reading(setting))
            out.append(setting)
    return out


def _blockwise_readings(shape: Sequence[int], cfg: dict, process_with: Callable[[dict], Callable[[tuple[slice, slice]], Block]],
                        labels_out: Optional[np.ndarray] = None, ignored: Sequence[str] = ()) -> pd.DataFrame:
    """The main setting block by block (painting ``labels_out``), then each distinct hypothesis's extra boxes."""
    main = _blockwise(shape, cfg, process_with(cfg), labels_out)
    return with_hypotheses(main, [_blockwise(shape, h, process_with(h)) for h in distinct_readings(cfg, ignored)])


def _head_plane(instance: Optional[np.ndarray], shape: Sequence[int]) -> Optional[np.ndarray]:
    """The first instance-head plane (``(H, W)`` or ``(C, H, W)``), checked against ``shape``."""
    if instance is None:
        return None
    plane = instance if instance.ndim == 2 else instance[0]
    if tuple(plane.shape) != tuple(shape):
        raise ValueError(f"instance head map has shape {tuple(plane.shape)}, expected {tuple(shape)}")
    return plane


def find_instances(probability: np.ndarray, cfg: Optional[dict] = None, instance: Optional[np.ndarray] = None,
                   labels_out: Optional[np.ndarray] = None) -> pd.DataFrame:
    """A binary probability map (H×W; float, float16 or uint8 0..255; NumPy or memmap) → instance table.

    ``instance``: the instance head's map (H×W or C×H×W, same dtypes), which splits touching cells;
    ``labels_out``: an H×W integer array (or memmap) of zeros to receive the instance label plane.
    Returns the columns of :data:`INSTANCE_COLUMNS`, sorted top-to-bottom, ``label_id`` = 1..N
    (the value of the instance's pixels in ``labels_out``), then the extra boxes of any ``hypotheses``
    (``label_id`` 0).
    """
    cfg = postprocess_config(cfg)
    if probability.ndim != 2:
        raise ValueError(f"expected an H×W probability map, got shape {probability.shape}")
    head = _head_plane(instance, probability.shape)

    def process_with(setting: dict) -> Callable[[tuple[slice, slice]], Block]:
        def process(window: tuple[slice, slice]) -> Block:
            prob = as_probability(probability[window])
            hmap = None if head is None else as_probability(head[window])
            release(probability, head)  # disk planes: the block is copied, the pages can go
            labels = label_mask(prob >= setting["threshold"], setting, hmap)
            return _boxes_of(instances_from_labels(labels, prob), labels, setting), labels
        return process

    return _blockwise_readings(probability.shape, cfg, process_with, labels_out, ignored=("multiclass",))  # one map


def foreground_names(class_names: Optional[Sequence[str]], channels: int) -> list[str]:
    """Names of the K foreground classes of a K+1-channel map (channel 0 is background).

    Accepts the K foreground names or all K+1 (the first is then the background's and dropped).
    """
    k = channels - 1
    names = list(class_names or [])
    if len(names) == channels:
        names = names[1:]
    if len(names) != k:
        if names:
            log.warning("%d class names for %d foreground channels; using class_1..class_%d", len(names), k, k)
        names = [f"class_{i}" for i in range(1, k + 1)]
    return [str(n) for n in names]


def find_class_instances(
    class_maps: np.ndarray, class_names: Optional[Sequence[str]] = None, cfg: Optional[dict] = None,
    instance: Optional[np.ndarray] = None, labels_out: Optional[np.ndarray] = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Decode K+1 softmax maps ``(K+1, H, W)`` (channel 0 = background) into instances with classes.

    A pixel is foreground when ``1 − p_background ≥ threshold``; its class is the foreground channel
    with the highest probability. With ``multiclass: per_class`` each class's pixels form their own
    components (split and filtered as in the binary case) and the instance's ``class_name`` is that
    class; with ``foreground`` the components come from the whole foreground and ``class_name`` is
    the class with the highest mean. Either way the seg score is computed on ``1 − p_background``
    and the class probabilities (second table, one column per class, rows aligned with the first)
    are the mean softmax of each class inside the instance. ``instance`` and ``labels_out`` are as
    in :func:`find_instances` (the baseline has the same instance head as the two-stage U-Net).
    """
    cfg = postprocess_config(cfg)
    if class_maps.ndim != 3 or class_maps.shape[0] < 2:
        raise ValueError(f"expected (K+1, H, W) class maps with K >= 1, got shape {class_maps.shape}")
    names = foreground_names(class_names, class_maps.shape[0])
    columns = [f"p_{i}" for i in range(len(names))]  # internal names: a class called "area" must not clash

    head = _head_plane(instance, class_maps.shape[1:])

    def process_with(setting: dict) -> Callable[[tuple[slice, slice]], Block]:
        def process(window: tuple[slice, slice]) -> Block:
            maps = as_probability(class_maps[(slice(None),) + window])
            hmap = None if head is None else as_probability(head[window])
            release(class_maps, head)
            fg = 1.0 - maps[0]
            mask = fg >= setting["threshold"]
            extra = {col: maps[i + 1] for i, col in enumerate(columns)}
            if setting["multiclass"] == "foreground":
                labels = label_mask(mask, setting, hmap)
                df = _boxes_of(instances_from_labels(labels, fg, extra), labels, setting)
                best = df[columns].to_numpy().argmax(axis=1) if len(df) else np.zeros(0, int)
                df["class_name"] = [names[i] for i in best]
                return df, labels
            winner = maps[1:].argmax(axis=0)
            combined = np.zeros(mask.shape, np.int32)
            parts = []
            for i, name in enumerate(names):
                labels = label_mask(mask & (winner == i), setting, hmap)
                df = _boxes_of(instances_from_labels(labels, fg, extra), labels, setting)
                offset = int(combined.max())
                combined[labels > 0] = labels[labels > 0] + offset
                df["label_id"] += offset
                df["class_name"] = name
                parts.append(df)
            nonempty = [df for df in parts if not df.empty]
            return (pd.concat(nonempty, ignore_index=True) if nonempty else parts[0]), combined
        return process

    table = _blockwise_readings(class_maps.shape[1:], cfg, process_with, labels_out)
    if "class_name" not in table:
        table["class_name"] = pd.Series(dtype="object")
        for col in columns:
            table[col] = pd.Series(dtype="float64")
    class_probs = table[columns].astype(np.float64).set_axis(names, axis=1).reset_index(drop=True)
    instances = table[INSTANCE_COLUMNS + ["class_name"]].reset_index(drop=True)
    return instances, class_probs
