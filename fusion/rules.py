"""Fusion rules: one score per class from the segmentation score and the classifier's probabilities.

The two stages see different things — the U-Net says "there is a cell here, how sure", the
classifier says "if this crop is a cell, which kind" — so neither alone ranks detections well for
the FROC: a confident class on a piece of debris, or a clear cell of an unsure class. Each rule
below combines them differently; the best one for a data set is chosen on validation FROC by
``cytofuse fuse fit`` and recorded in ``fusion.json`` and ``run.json``.

Rules (``seg`` is the object's segmentation score, ``cls_c`` the classifier's probability of c):

- ``geometric``  ``seg^w · cls_c^(1-w)`` (``w`` = ``weight``)
- ``product``    ``seg · cls_c``
- ``arithmetic`` ``w · seg + (1-w) · cls_c``
- ``classifier`` ``cls_c``
- ``seg_share``  ``seg · cls_c / Σ_k cls_k`` — the object's seg score split by class share
- ``logistic``   ``σ(b_c + a_c · [logit seg, logit cls_c, logit max_k cls_k])``: a per-class logistic
  regression fitted on validation candidates (numpy Newton/IRLS with an L2 penalty).
- ``specimen``   the logistic rule plus the cell's *image's* evidence: ``logit e_c`` and ``log share_c``,
  where ``e_c`` is the mean of the image's ``specimen_k`` highest ``seg · cls_c`` and ``share_c`` =
  ``e_c / Σ_k e_k``. One specimen usually carries one tumour type, so a cell the classifier finds
  ambiguous between SCC and AC is pulled towards the type its image shows clearly elsewhere, and a
  lone confident cell in an image without other evidence is pulled down. Fitted on validation
  candidates only, like ``logistic``.
- ``shape``      the logistic rule plus the object's geometry (:func:`fusion.geometry.cell_geometry`): its
  size against its image's median object and whether its box touches the image border. Slivers and
  cells cut by the border look like their neighbours to a classifier that sees a fixed window, but
  annotators leave them unboxed. Fitted on validation candidates only, like ``logistic``.
- ``specimen_shape`` both: the specimen rule's features and the shape rule's geometry.
- ``semantic_shape`` the shape rule plus ``logit u_c``, the segmentation U-Net's *own* mean probability of
  class c inside the object, when the U-Net is a K+1-class one (``targets.mode: classes``). The U-Net
  sees a wide field at once (the tissue around a nucleus, its neighbours), the classifier a small crop
  at full resolution, so their errors need not coincide (the single-stage U-Net ranks MoNuSAC's
  macrophages and neutrophils better than the crop classifier does, epithelial nuclei far worse).
  Fitted on validation candidates only; offered by ``fuse fit`` only when the candidates carry the
  U-Net's class probabilities.
- ``specimen_shape_rank`` ``specimen_shape`` plus the object's rank for the class in its image (``log r``,
  ``r = 1`` for the image's highest ``seg · cls_c``): how many cells of a kind an image holds is a
  property of the specimen (a blood smear shows one white cell among dozens of red ones), and when
  post-processing offers several readings of a cluster (a whole cell and its pieces), the pieces rank
  below the whole. Fitted on validation candidates only; ``fuse fit`` keeps it only if it wins there.

Multi-label consistency: SCC and AC are sub-types of NSCLC, so a cell scored SCC 0.8 is at least
NSCLC 0.8; :func:`apply_hierarchy` lifts parents to the max of their children after fusion.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, NamedTuple, Optional, Sequence, Union

import numpy as np

#: Rules with fitted per-class parameters (``cytofuse fuse fit``), in the order it compares them.
FITTED: tuple[str, ...] = ("logistic", "specimen", "shape", "specimen_shape", "specimen_shape_rank", "semantic_shape")
RULES: tuple[str, ...] = ("geometric", "product", "arithmetic", "classifier", "seg_share") + FITTED
FITTED_RULES = frozenset(FITTED)
#: Fitted rules that read the image's evidence (``specimen_k``) and the object's geometry.
IMAGE_RULES = frozenset({"specimen", "specimen_shape", "specimen_shape_rank"})
SHAPE_RULES = frozenset({"shape", "specimen_shape", "specimen_shape_rank", "semantic_shape"})
#: Fitted rules that also read a K+1-class segmentation U-Net's own class probabilities.
SEMANTIC_RULES = frozenset({"semantic_shape"})
#: Fitted rules that also read the object's rank for the class among its image's candidates.
RANK_RULES = frozenset({"specimen_shape_rank"})
#: Rules whose ``weight`` matters.
WEIGHTED_RULES = frozenset({"geometric", "arithmetic"})
#: The default hierarchy, used when every name in it is in the class list.
DEFAULT_HIERARCHY: dict[str, list[str]] = {"NSCLC": ["SCC", "AC"]}
#: Probabilities are clipped to [EPS, 1-EPS] before taking logits, so 0 and 1 stay finite.
EPS = 1e-6
#: Number of logistic features per class.
N_FEATURES = 3
FEATURE_NAMES: tuple[str, ...] = ("logit_seg", "logit_cls", "logit_max_cls")
#: Features of the specimen rule: the logistic ones plus the image's evidence for the class.
SPECIMEN_FEATURE_NAMES: tuple[str, ...] = FEATURE_NAMES + ("logit_image_evidence", "log_image_share")
#: The object's geometry (fusion.geometry.cell_geometry), which the shape rules add to their features.
GEOMETRY_FEATURE_NAMES: tuple[str, ...] = ("log_relative_area", "touches_border")
#: Features of the shape rule: the logistic ones plus the object's geometry.
SHAPE_FEATURE_NAMES: tuple[str, ...] = FEATURE_NAMES + GEOMETRY_FEATURE_NAMES
#: Coefficients each fitted rule needs per class.
FEATURE_COUNTS: dict[str, int] = {"logistic": N_FEATURES, "specimen": len(SPECIMEN_FEATURE_NAMES),
                                  "shape": len(SHAPE_FEATURE_NAMES),
                                  "specimen_shape": len(SPECIMEN_FEATURE_NAMES) + len(GEOMETRY_FEATURE_NAMES),
                                  "specimen_shape_rank": len(SPECIMEN_FEATURE_NAMES) + len(GEOMETRY_FEATURE_NAMES) + 1,
                                  "semantic_shape": len(SHAPE_FEATURE_NAMES) + 1}
#: Candidates of an image whose scores make up its evidence for a class.
DEFAULT_SPECIMEN_K = 5


@dataclass
class FusionRule:
    """A fusion rule and its parameters, as stored in configs, ``fusion.json`` and ``run.json``."""

    name: str = "geometric"
    weight: float = 0.5
    hierarchy: dict[str, list[str]] = field(default_factory=dict)
    logistic: Optional[dict[str, dict[str, Any]]] = None  # class -> {"coef": [FEATURE_COUNTS[name] floats], "intercept": float}
    specimen_k: int = DEFAULT_SPECIMEN_K  # the specimen rule's image evidence: mean of this many top scores

    def __post_init__(self) -> None:
        if self.name not in RULES:
            raise ValueError(f"unknown fusion rule {self.name!r}; choose one of {', '.join(RULES)}")
        if not 0.0 <= float(self.weight) <= 1.0:
            raise ValueError(f"fusion weight must be in [0, 1], got {self.weight}")
        self.weight = float(self.weight)
        if self.name in FITTED_RULES and not self.logistic:
            raise ValueError(f"the {self.name} fusion rule needs fitted parameters (run `cytofuse fuse fit`, then pass --fusion fusion.json)")
        if int(self.specimen_k) < 1:
            raise ValueError(f"fusion specimen_k must be at least 1, got {self.specimen_k}")
        self.specimen_k = int(self.specimen_k)

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"rule": self.name, "weight": self.weight, "hierarchy": {k: list(v) for k, v in self.hierarchy.items()}}
        if self.name in IMAGE_RULES:
            out["specimen_k"] = self.specimen_k
        if self.logistic is not None:
            out["logistic"] = {
                c: {**p, "coef": [float(x) for x in p["coef"]], "intercept": float(p["intercept"])} for c, p in self.logistic.items()
            }
        return out

    def describe(self) -> str:
        if self.name in WEIGHTED_RULES:
            return f"{self.name}(w={self.weight:g})"
        return self.name

    @classmethod
    def from_config(cls, block: Mapping[str, Any], class_names: Sequence[str]) -> "FusionRule":
        """Build from the ``fusion:`` config block (or a ``fusion.json``'s), checked against the classes."""
        name = str(block.get("rule", "geometric"))
        logistic = block.get("logistic")
        if logistic is not None:
            missing = [c for c in class_names if c not in logistic]
            if missing:
                raise ValueError(
                    f"logistic fusion parameters have no entry for class(es) {', '.join(missing)} "
                    f"(they were fitted for {', '.join(logistic)}); refit with `cytofuse fuse fit`"
                )
            need = FEATURE_COUNTS.get(name, N_FEATURES)
            for c in class_names:
                if name in FITTED_RULES and len(logistic[c].get("coef", [])) != need:
                    raise ValueError(f"{name} fusion parameters for {c!r} need {need} coefficients")
        return cls(
            name=name,
            weight=float(block.get("weight", 0.5)),
            hierarchy=resolve_hierarchy(block.get("hierarchy", "auto"), class_names),
            logistic=dict(logistic) if logistic is not None else None,
            specimen_k=int(block.get("specimen_k") or DEFAULT_SPECIMEN_K),
        )


# ---------------------------------------------------------------------------------------- hierarchy


def resolve_hierarchy(spec: Union[str, None, Mapping[str, Sequence[str]]], class_names: Sequence[str]) -> dict[str, list[str]]:
    """``"auto"`` → ``{NSCLC: [SCC, AC]}`` restricted to present classes (if NSCLC and a child exist);
    ``None``/``"none"`` → no hierarchy; a mapping is checked against the class list."""
    names = list(class_names)
    if spec is None or (isinstance(spec, str) and spec.lower() in ("none", "off", "")):
        return {}
    if isinstance(spec, str):
        if spec.lower() != "auto":
            raise ValueError(f"hierarchy must be 'auto', 'none' or a mapping parent: [children], not {spec!r}")
        out: dict[str, list[str]] = {}
        for parent, children in DEFAULT_HIERARCHY.items():
            present = [c for c in children if c in names]
            if parent in names and present:
                out[parent] = present
        return out
    if not isinstance(spec, Mapping):
        raise ValueError(f"hierarchy must be 'auto', 'none' or a mapping parent: [children], not {type(spec).__name__}")
    out = {}
    for parent, children in spec.items():
        children = [children] if isinstance(children, str) else list(children)
        unknown = [n for n in [parent, *children] if n not in names]
        if unknown:
            raise ValueError(f"hierarchy names unknown class(es) {', '.join(map(str, unknown))}; classes: {', '.join(names)}")
        out[str(parent)] = [str(c) for c in children]
    return out


def apply_hierarchy(scores: np.ndarray, class_names: Sequence[str], hierarchy: Mapping[str, Sequence[str]]) -> np.ndarray:
    """Raise each parent's score to at least the max of its children's (returns a copy)."""
    out = np.array(scores, np.float64, copy=True).reshape(-1, len(class_names))
    index = {c: i for i, c in enumerate(class_names)}
    for parent, children in hierarchy.items():
        kids = [index[c] for c in children]
        if kids:
            out[:, index[parent]] = np.maximum(out[:, index[parent]], out[:, kids].max(axis=1))
    return out


def label_marginals(probs: np.ndarray, class_names: Sequence[str], hierarchy: Mapping[str, Sequence[str]]) -> np.ndarray:
    """Multi-hot class probabilities from a single-label softmax: each parent gains its children's mass.

    A K+1-class U-Net paints a multi-label cell (SCC + NSCLC) with one class, so its softmax never
    says "NSCLC" for an SCC cell; the probability that the cell *is* NSCLC in the multi-hot sense is
    the mass of NSCLC-NOS plus its sub-types. ``probs`` is ``(N, K)`` mean softmax per object; the
    result is clipped to [0, 1] (the sum can only exceed 1 by rounding).
    """
    out = np.array(probs, np.float64, copy=True).reshape(-1, len(class_names))
    index = {c: i for i, c in enumerate(class_names)}
    source = out.copy()
    for parent, children in hierarchy.items():
        kids = [index[c] for c in children if c in index]
        if parent in index and kids:
            out[:, index[parent]] = source[:, index[parent]] + source[:, kids].sum(axis=1)
    return np.clip(out, 0.0, 1.0)


# ------------------------------------------------------------------------------------------- fusion


def logit(p: np.ndarray) -> np.ndarray:
    q = np.clip(np.asarray(p, np.float64), EPS, 1.0 - EPS)
    return np.log(q) - np.log1p(-q)


def sigmoid(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, np.float64)
    return np.where(z >= 0, 1.0 / (1.0 + np.exp(-np.abs(z))), np.exp(-np.abs(z)) / (1.0 + np.exp(-np.abs(z))))


def logistic_features(seg: np.ndarray, cls: np.ndarray) -> np.ndarray:
    """``(N, K, 3)`` features ``[logit seg, logit cls_c, logit max_k cls_k]`` for every box and class."""
    s, c = _check(seg, cls)
    n, k = c.shape
    feats = np.empty((n, k, N_FEATURES), np.float64)
    feats[..., 0] = logit(s)[:, None]
    feats[..., 1] = logit(c)
    feats[..., 2] = logit(c.max(axis=1) if k else np.zeros(n))[:, None]
    return feats


def fuse_scores(seg: np.ndarray, cls: np.ndarray, rule: FusionRule, class_names: Sequence[str],
                geometry: Optional[np.ndarray] = None, seg_class: Optional[np.ndarray] = None) -> np.ndarray:
    """``(N, K)`` fused scores in [0, 1] for ``N`` boxes, hierarchy applied; ``geometry`` is the boxes'
    ``(N, 2)`` :func:`fusion.geometry.cell_geometry`, which only the shape rules read (and need);
    ``seg_class`` the ``(N, K)`` U-Net class probabilities only the semantic rules read (and need)."""
    s, c = _check(seg, cls)
    if c.shape[1] != len(class_names):
        raise ValueError(f"classifier gave {c.shape[1]} classes but {len(class_names)} class names were given")
    w = rule.weight
    col = s[:, None]
    if rule.name == "geometric":
        fused = np.power(col, w) * np.power(c, 1.0 - w)
    elif rule.name == "product":
        fused = col * c
    elif rule.name == "arithmetic":
        fused = w * col + (1.0 - w) * c
    elif rule.name == "classifier":
        fused = c.copy()
    elif rule.name == "seg_share":
        total = c.sum(axis=1, keepdims=True)
        share = np.divide(c, total, out=np.full_like(c, 1.0 / max(c.shape[1], 1)), where=total > 0)
        fused = col * share
    elif rule.name in FITTED_RULES:
        fused = feature_scores(fitted_features(rule.name, s, c, geometry, rule.specimen_k, seg_class), rule.logistic or {},
                               class_names)
    else:  # unreachable: FusionRule checks the name
        raise ValueError(rule.name)
    return apply_hierarchy(np.clip(fused, 0.0, 1.0), class_names, rule.hierarchy)


def feature_scores(feats: np.ndarray, params: Mapping[str, Mapping[str, Any]], class_names: Sequence[str]) -> np.ndarray:
    """``(N, K)`` per-class logistic scores of ``(N, K, F)`` features with fitted ``params``."""
    out = np.empty(feats.shape[:2], np.float64)
    for j, name in enumerate(class_names):
        p = params[name]
        out[:, j] = sigmoid(feats[:, j, :] @ np.asarray(p["coef"], np.float64) + float(p["intercept"]))
    return out


def fitted_features(name: str, seg: np.ndarray, cls: np.ndarray, geometry: Optional[np.ndarray] = None,
                    k: int = DEFAULT_SPECIMEN_K, seg_class: Optional[np.ndarray] = None) -> np.ndarray:
    """``(N, K, F)`` features of the fitted rule ``name`` for one image's candidates."""
    if name not in FITTED_RULES:
        raise ValueError(f"{name!r} is not a fitted fusion rule")
    base = specimen_features(seg, cls, k) if name in IMAGE_RULES else logistic_features(seg, cls)
    if name not in SHAPE_RULES:
        return base
    if geometry is None:
        raise ValueError(f"the {name} fusion rule needs each box's geometry (fusion.geometry.cell_geometry)")
    width = len(GEOMETRY_FEATURE_NAMES)
    g = np.asarray(geometry, np.float64).reshape(-1, width)
    if len(g) != len(base):
        raise ValueError(f"{len(base)} boxes but geometry for {len(g)}")
    out = np.concatenate([base, np.broadcast_to(g[:, None, :], (len(g), base.shape[1], width))], axis=2)
    if name in RANK_RULES:
        out = np.concatenate([out, np.log(image_ranks(seg, cls))[..., None]], axis=2)
    if name in SEMANTIC_RULES:
        if seg_class is None:
            raise ValueError(f"the {name} fusion rule needs a K+1-class segmentation U-Net (targets.mode: classes): "
                             "this one gives no class probabilities")
        u = np.asarray(seg_class, np.float64)
        u = u.reshape(len(out), u.shape[-1] if u.ndim == 2 else -1)  # (0, K) for an image without objects
        if u.shape[1] != out.shape[1]:
            raise ValueError(f"the U-Net gave {u.shape[1]} class probabilities but the classifier {out.shape[1]}")
        out = np.concatenate([out, logit(u)[..., None]], axis=2)
    return out


def image_ranks(seg: np.ndarray, cls: np.ndarray) -> np.ndarray:
    """``(N, K)`` each candidate's rank for each class among one image's candidates by ``seg · cls_c``:
    1 for the highest, ties sharing the better rank (two equal boxes are equally likely the image's one)."""
    s, c = _check(seg, cls)
    joint = s[:, None] * c
    if not len(joint):
        return np.ones_like(joint)
    ordered = np.sort(joint, axis=0)  # ascending, per class
    better = np.stack([len(joint) - np.searchsorted(ordered[:, j], joint[:, j], side="right")
                       for j in range(joint.shape[1])], axis=1)
    return (better + 1).astype(np.float64)


def image_evidence(seg: np.ndarray, cls: np.ndarray, k: int = DEFAULT_SPECIMEN_K) -> np.ndarray:
    """``(K,)`` one image's evidence for each class: the mean of its ``k`` highest ``seg · cls_c``
    (fewer when the image has fewer candidates; 0 with none)."""
    s, c = _check(seg, cls)
    if not len(s):
        return np.zeros(c.shape[1])
    joint = s[:, None] * c
    top = -np.sort(-joint, axis=0)[: max(1, int(k))]
    return top.mean(axis=0)


def specimen_features(seg: np.ndarray, cls: np.ndarray, k: int = DEFAULT_SPECIMEN_K) -> np.ndarray:
    """``(N, K, 5)``: the logistic features plus ``[logit e_c, log share_c]`` of the image (all candidates
    of ``seg``/``cls`` must come from one image)."""
    s, c = _check(seg, cls)
    base = logistic_features(s, c)
    e = image_evidence(s, c, k)
    share = e / e.sum() if e.sum() > 0 else np.full_like(e, 1.0 / max(len(e), 1))
    image = np.stack([logit(e), np.log(np.clip(share, EPS, 1.0))], axis=1)  # (K, 2)
    return np.concatenate([base, np.broadcast_to(image, (len(s),) + image.shape)], axis=2)


def _check(seg: np.ndarray, cls: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(seg, np.float64).reshape(-1)
    c = np.asarray(cls, np.float64)
    if len(s) == 0 and c.ndim == 2:
        return s, c.reshape(0, c.shape[1])
    c = c.reshape(len(s), -1) if len(s) else c
    if c.ndim != 2 or len(c) != len(s):
        raise ValueError(f"{len(s)} segmentation scores but classifier output of shape {np.shape(cls)}")
    return np.clip(s, 0.0, 1.0), np.clip(c, 0.0, 1.0)


# ------------------------------------------------------------------------------ logistic regression


def fit_logistic(
    x: np.ndarray, y: np.ndarray, l2: float = 1e-2, max_iter: int = 100, tol: float = 1e-9, sample_weight: Optional[np.ndarray] = None
) -> tuple[np.ndarray, float]:
    """L2-penalised logistic regression by Newton's method (IRLS) with step halving.

    Minimises ``mean(w_i · logloss_i) + l2/2 · ||coef||²`` (the intercept is not penalised). The
    penalty keeps the solution finite on separable data, where a plain maximum-likelihood fit would
    diverge — and validation candidates of a good model are often nearly separable.
    """
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64).reshape(-1)
    if x.ndim != 2 or len(x) != len(y):
        raise ValueError(f"features {x.shape} do not match {len(y)} targets")
    if len(y) == 0 or y.min() == y.max():
        raise ValueError("logistic fit needs both positive and negative examples")
    sw = np.ones(len(y)) if sample_weight is None else np.asarray(sample_weight, np.float64).reshape(-1)
    sw = sw / sw.mean()
    n, d = x.shape
    xa = np.hstack([x, np.ones((n, 1))])
    penalty = np.full(d + 1, float(l2))
    penalty[-1] = 1e-10  # keep the Hessian invertible without shrinking the intercept
    theta = np.zeros(d + 1)
    base = float(np.clip(np.average(y, weights=sw), 1e-6, 1 - 1e-6))
    theta[-1] = np.log(base / (1 - base))

    def loss(t: np.ndarray) -> float:
        z = xa @ t
        # log(1 + e^z) - y z, computed stably
        return float(np.mean(sw * (np.logaddexp(0.0, z) - y * z)) + 0.5 * np.sum(penalty * t * t))

    current = loss(theta)
    for _ in range(max_iter):
        p = sigmoid(xa @ theta)
        grad = xa.T @ (sw * (p - y)) / n + penalty * theta
        hess = (xa * (sw * p * (1 - p))[:, None]).T @ xa / n + np.diag(penalty)
        try:
            step = np.linalg.solve(hess, grad)
        except np.linalg.LinAlgError:
            step = np.linalg.lstsq(hess, grad, rcond=None)[0]
        scale = 1.0
        while True:
            candidate = theta - scale * step
            new = loss(candidate)
            if new <= current or scale < 1e-8:
                break
            scale /= 2.0
        theta = candidate
        improvement = current - new
        current = new
        if abs(improvement) < tol or np.max(np.abs(scale * step)) < 1e-10:
            break
    return theta[:d], float(theta[d])


def fit_feature_rule(
    name: str,
    feats: np.ndarray,
    targets: np.ndarray,
    class_names: Sequence[str],
    l2: float = 1e-2,
    hierarchy: Optional[Mapping[str, Sequence[str]]] = None,
    specimen_k: int = DEFAULT_SPECIMEN_K,
) -> FusionRule:
    """Fit a per-class logistic rule ``name`` on candidates' ``(N, K, F)`` features and ``(N, K)`` 0/1
    ``targets`` (hit a ground-truth box of the class).

    The fit is unweighted so the scores stay calibrated probabilities: the hierarchy (NSCLC ≥ SCC)
    and NMS compare scores *across* classes, which re-balanced weights would distort. A class whose
    targets are all 0 or all 1 cannot be fitted: it gets a fixed rule that ranks like the geometric
    mean (equal weights on the seg and class logits, none on the rest) and is marked ``fitted: false``.
    """
    x = np.asarray(feats, np.float64)
    n_feat = FEATURE_COUNTS[name]
    if x.ndim != 3 or x.shape[1:] != (len(class_names), n_feat):
        raise ValueError(f"{name} rule: features of shape {x.shape}, expected (N, {len(class_names)}, {n_feat})")
    t = np.asarray(targets, np.float64).reshape(x.shape[0], -1)
    if t.shape[1] != len(class_names):
        raise ValueError(f"targets have {t.shape[1]} classes but {len(class_names)} class names were given")
    params: dict[str, dict[str, Any]] = {}
    for j, cname in enumerate(class_names):
        y = t[:, j]
        n_pos = int(y.sum())
        if n_pos == 0 or n_pos == len(y):
            params[cname] = unfitted_params(n_feat, n_pos, int(len(y)))
            continue
        coef, intercept = fit_logistic(x[:, j, :], y, l2=l2)
        params[cname] = {"coef": coef.tolist(), "intercept": intercept, "fitted": True, "n_pos": n_pos, "n": int(len(y))}
    return FusionRule(name=name, weight=0.5, hierarchy=dict(hierarchy or {}), logistic=params, specimen_k=specimen_k)


def unfitted_params(n_features: int, n_pos: Optional[int], n: Optional[int]) -> dict[str, Any]:
    """One class's parameters when it cannot be fitted (or, cross-fitting, not trusted): equal weights on
    the seg and class logits, none on the other features, so it ranks like the geometric mean."""
    return {"coef": [0.5, 0.5] + [0.0] * (n_features - 2), "intercept": 0.0, "fitted": False, "n_pos": n_pos, "n": n}


def fit_logistic_rule(
    seg: np.ndarray,
    cls: np.ndarray,
    targets: np.ndarray,
    class_names: Sequence[str],
    l2: float = 1e-2,
    hierarchy: Optional[Mapping[str, Sequence[str]]] = None,
) -> FusionRule:
    """Fit the per-class logistic rule on candidates with ``(N, K)`` 0/1 ``targets`` (hit a GT box of c)."""
    return fit_feature_rule("logistic", logistic_features(seg, cls), targets, class_names, l2, hierarchy)


class FitImage(NamedTuple):
    """One validation image's candidates for fitting a rule: what the features are built from.

    A plain ``(seg, cls, geometry, targets)`` tuple is one too; ``seg_class_probs`` (a K+1-class U-Net's
    ``(N, K)`` class probabilities, or None) only the semantic rules need.
    """

    seg: np.ndarray  # (N,) segmentation scores
    cls: np.ndarray  # (N, K) classifier probabilities
    geometry: Optional[np.ndarray]  # (N, 2) cell geometry, or None for rules without shape features
    targets: np.ndarray  # (N, K) 0/1 labels of each candidate
    seg_class_probs: Optional[np.ndarray] = None


def fit_image_rule(
    name: str,
    images: Sequence[Union[FitImage, tuple]],
    class_names: Sequence[str],
    k: int = DEFAULT_SPECIMEN_K,
    l2: float = 1e-2,
    hierarchy: Optional[Mapping[str, Sequence[str]]] = None,
) -> FusionRule:
    """Fit the fitted rule ``name`` on validation images (:class:`FitImage` each). Features are built per
    image (an image's evidence and its median object need all of its candidates), then stacked."""
    kk = len(class_names)
    used = [im for im in (FitImage(*im) for im in images) if len(np.asarray(im.seg).reshape(-1))]
    feats = [fitted_features(name, im.seg, im.cls, im.geometry, k, im.seg_class_probs) for im in used]
    x = np.concatenate(feats) if feats else np.zeros((0, kk, FEATURE_COUNTS[name]))
    t = np.concatenate([np.asarray(im.targets, np.float64).reshape(-1, kk) for im in used]) if used else np.zeros((0, kk))
    return fit_feature_rule(name, x, t, class_names, l2, hierarchy, specimen_k=k)


def fit_specimen_rule(
    images: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
    class_names: Sequence[str],
    k: int = DEFAULT_SPECIMEN_K,
    l2: float = 1e-2,
    hierarchy: Optional[Mapping[str, Sequence[str]]] = None,
) -> FusionRule:
    """The specimen rule on images ``(seg, cls, targets)``: :func:`fit_image_rule` without geometry."""
    return fit_image_rule("specimen", [FitImage(s, c, None, t) for s, c, t in images], class_names, k, l2, hierarchy)
