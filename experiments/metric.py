"""The challenge's official metric, re-exported from :mod:`cytocore.froc` where it lives.

The metric's core moved to ``cytocore`` so the segmentation stage can choose its checkpoint and
thresholds by it (a stage must not import ``experiments``); this module keeps the historic import
path for the experiments code, the tests and users' scripts.
"""
from cytocore.froc import (  # noqa: F401
    FP,
    FP_RATES,
    IGNORED,
    IOP_THRESHOLD,
    TP,
    FrocResult,
    Thresholds,
    class_froc,
    froc_from_counts,
    iop_matrix,
    match_predictions,
    operating_points,
    score_order,
)
