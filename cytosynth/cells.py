"""Drawing of single Papanicolaou-stained cells for the synthetic data set.

Cells are painted as optical density (Beer-Lambert: image = background × exp(-OD)), not as opaque
colours, because cytology cells are translucent: where two cells overlap the stains add up and the
overlap is darker, as on a real slide, instead of one cell pasting over the other. Each cell is a
:class:`Sprite` on its own small patch; the scene (:mod:`cytosynth.scene`) pastes the patches, decides who
lies on top (for occlusion and the mask) and turns the density into RGB.

Sizes are in pixels at about 0.5 µm per pixel (a 40× field), so a lymphocyte is ~12 px across and the
scale does not change with the image size: a larger image is a larger field of view.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from scipy import ndimage

#: Kinds of malignant cell (the tumour type of the image) and their multi-hot rows are in synth.py.
MALIGNANT_KINDS = ("SCC", "AC", "SCLC", "NSCLC")

# Stain absorption vectors (optical density per unit of stain, RGB), max component 1. Hematoxylin
# is blue-purple, Orange G orange (keratin), eosin/EA pink, Light Green SF the blue-green of
# cyanophilic cytoplasm: the four colours a Pap slide is read by.
_HEMA = np.array([0.84, 1.00, 0.55], np.float32)
_ORANGE = np.array([0.06, 0.48, 1.00], np.float32)
_EOSIN = np.array([0.08, 1.00, 0.62], np.float32)
_GREEN = np.array([1.00, 0.42, 0.50], np.float32)
_PIGMENT = np.array([0.75, 0.88, 1.00], np.float32)


@dataclass
class Stains:
    """One slide's stain colours: every slide is stained a little differently."""

    hema: np.ndarray
    orange: np.ndarray
    eosin: np.ndarray
    green: np.ndarray
    pigment: np.ndarray
    background: np.ndarray  # RGB in [0, 1], the light through the bare glass

    def mix(self, green: float = 0.0, eosin: float = 0.0, orange: float = 0.0) -> np.ndarray:
        """Absorption of a cytoplasm stained by several dyes at once (amphophilic, keratinising...)."""
        return (green * self.green + eosin * self.eosin + orange * self.orange).astype(np.float32)


def random_stains(rng: np.random.Generator) -> Stains:
    """Jitter hue and strength of each dye and tint the background, as between real slides."""

    def jitter(v: np.ndarray, hue: float = 0.10) -> np.ndarray:
        w = v * np.exp(rng.normal(0.0, hue, 3))
        return (w / w.max() * rng.uniform(0.85, 1.15)).astype(np.float32)

    base = rng.uniform(0.90, 0.97)
    tint = rng.normal(0.0, 0.012, 3)
    tint[2] += rng.uniform(-0.01, 0.02)  # Pap backgrounds range from warm grey to faintly blue
    return Stains(
        hema=jitter(_HEMA, 0.08),
        orange=jitter(_ORANGE),
        eosin=jitter(_EOSIN),
        green=jitter(_GREEN),
        pigment=jitter(_PIGMENT, 0.05),
        background=np.clip(base + tint, 0.8, 1.0).astype(np.float32),
    )


class Textures:
    """Tileable noise at three grain sizes, made once per image and sampled by every cell.

    Chromatin, keratin streaks and foamy cytoplasm are all noise at some grain; making three
    periodic fields once and reading windows of them (at a random offset per cell) is much cheaper
    than filtering noise for each of a hundred cells.
    """

    SIZE = 128

    def __init__(self, rng: np.random.Generator) -> None:
        white = rng.standard_normal((3, self.SIZE, self.SIZE)).astype(np.float32)
        self.fine = _unit(ndimage.gaussian_filter(white[0], 0.6, mode="wrap"))
        self.medium = _unit(ndimage.gaussian_filter(white[1], 1.4, mode="wrap"))
        self.coarse = _unit(ndimage.gaussian_filter(white[2], 3.0, mode="wrap"))

    def window(self, field: np.ndarray, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
        oy, ox = rng.integers(0, self.SIZE, 2)
        ys = (oy + np.arange(shape[0])) % self.SIZE
        xs = (ox + np.arange(shape[1])) % self.SIZE
        return field[np.ix_(ys, xs)]


def _unit(a: np.ndarray) -> np.ndarray:
    return ((a - a.mean()) / (a.std() + 1e-6)).astype(np.float32)


@dataclass
class Sprite:
    """One painted object on its own patch; ``cover`` (0..1) is the cell body that can hide others.

    ``y0, x0`` is the patch's top-left pixel in the image and may be negative (a cell cut by the
    image border keeps its full area, so the visible fraction counts what the border cuts off).
    """

    y0: int
    x0: int
    od: np.ndarray
    cover: np.ndarray
    kind: str
    z: float = 0.5

    @property
    def malignant(self) -> bool:
        return self.kind in MALIGNANT_KINDS


@dataclass
class Grid:
    """Pixel coordinates of a patch relative to a cell centre (broadcasting column and row)."""

    y0: int
    x0: int
    dy: np.ndarray  # (h, 1)
    dx: np.ndarray  # (1, w)

    @property
    def shape(self) -> tuple[int, int]:
        return self.dy.shape[0], self.dx.shape[1]

    def shifted(self, oy: float, ox: float) -> "Grid":
        return Grid(self.y0, self.x0, self.dy - oy, self.dx - ox)


def grid_around(cy: float, cx: float, half: float) -> Grid:
    y0, x0 = int(np.floor(cy - half)), int(np.floor(cx - half))
    n = int(np.ceil(2 * half)) + 2
    dy = (np.arange(n, dtype=np.float32) + y0 - cy)[:, None]
    dx = (np.arange(n, dtype=np.float32) + x0 - cx)[None, :]
    return Grid(y0, x0, dy, dx)


@dataclass
class Outline:
    """A star-shaped cell or nucleus outline: ellipse × smooth wobble × optional polygon.

    ``radius`` is the geometric-mean radius in pixels, ``aspect`` the major/minor axis ratio. Harmonics
    give the irregular nuclear contours that mark malignancy; the polygon gives the angular outlines of
    squamous cells.
    """

    radius: float
    aspect: float = 1.0
    angle: float = 0.0
    harm_k: Optional[np.ndarray] = None
    harm_a: Optional[np.ndarray] = None
    harm_p: Optional[np.ndarray] = None
    poly_ang: Optional[np.ndarray] = None
    poly_rad: Optional[np.ndarray] = None

    def reach(self) -> float:
        """An upper bound on the distance from the centre to the outline, for sizing patches."""
        wobble = 1.0 + (np.abs(self.harm_a).sum() if self.harm_a is not None else 0.0)
        poly = float(self.poly_rad.max()) if self.poly_rad is not None else 1.0
        return float(self.radius * np.sqrt(self.aspect) * wobble * poly) + 2.0

    def q(self, g: Grid) -> tuple[np.ndarray, np.ndarray]:
        """Normalised radius (``< 1`` inside) and the outline's radius in pixels along each ray."""
        c, s = np.cos(self.angle), np.sin(self.angle)
        a = np.sqrt(self.aspect)
        u = (g.dx * c + g.dy * s) / (self.radius * a)
        v = (-g.dx * s + g.dy * c) / (self.radius / a)
        rho = np.maximum(np.hypot(u, v), 1e-6)
        r = np.ones_like(rho)
        if self.harm_k is not None and len(self.harm_k):
            # cos(kθ + φ) as the real part of e^{iφ}·(e^{iθ})^k: powers instead of arctan2 and cosines.
            e = np.empty(rho.shape, np.complex64)
            e.real, e.imag = u / rho, v / rho
            power = {1: e}
            for k in range(2, int(max(self.harm_k)) + 1):
                power[k] = power[k - 1] * e
            for k, amp, ph in zip(self.harm_k, self.harm_a, self.harm_p):
                r += amp * (np.exp(1j * ph) * power[int(k)]).real
        if self.poly_ang is not None:
            r *= _polygon_radius(np.arctan2(v, u), self.poly_ang, self.poly_rad)
        # Pixel distance scale along the ray: between the minor and major semi-axis.
        scale = self.radius * np.hypot(u * a, v / a) / rho
        return rho / r, r * scale

    def cover(self, g: Grid, soft: float = 0.8) -> tuple[np.ndarray, np.ndarray]:
        """Anti-aliased coverage (0..1) and the normalised radius, for rims and zones."""
        q, rpx = self.q(g)
        return np.clip((1.0 - q) * rpx / soft + 0.5, 0.0, 1.0).astype(np.float32), q


def _polygon_radius(th: np.ndarray, ang: np.ndarray, rad: np.ndarray) -> np.ndarray:
    """Distance from the centre to a star polygon's edge along each ray angle ``th``."""
    n = len(ang)
    idx = np.searchsorted(ang, th)
    i, j = (idx - 1) % n, idx % n
    vix, viy = rad[i] * np.cos(ang[i]), rad[i] * np.sin(ang[i])
    vjx, vjy = rad[j] * np.cos(ang[j]), rad[j] * np.sin(ang[j])
    num = vix * vjy - viy * vjx
    den = np.cos(th) * (vjy - viy) - np.sin(th) * (vjx - vix)
    return num / np.maximum(den, 1e-6)


def random_outline(
    rng: np.random.Generator,
    radius: float,
    aspect: tuple[float, float] = (1.0, 1.2),
    wobble: float = 0.04,
    kmax: int = 5,
    polygon: int = 0,
    angle: Optional[float] = None,
) -> Outline:
    """An outline with random orientation, elongation, wobble and (if ``polygon``) corners."""
    ks = np.arange(2, kmax + 1)
    amps = rng.uniform(0.3, 1.0, len(ks)) * wobble / np.sqrt(ks - 1)
    o = Outline(
        radius=radius,
        aspect=float(rng.uniform(*aspect)),
        angle=float(rng.uniform(0, np.pi) if angle is None else angle),
        harm_k=ks,
        harm_a=amps,
        harm_p=rng.uniform(0, 2 * np.pi, len(ks)),
    )
    if polygon:
        base = np.linspace(-np.pi, np.pi, polygon, endpoint=False)
        ang = np.sort(base + rng.uniform(-0.35, 0.35, polygon) * (2 * np.pi / polygon))
        o.poly_ang = ang
        o.poly_rad = rng.uniform(0.85, 1.2, polygon)
    return o


def _disc(g: Grid, cy: float, cx: float, r: float) -> np.ndarray:
    d = np.hypot(g.dy - cy, g.dx - cx)
    return np.clip(r - d + 0.5, 0.0, 1.0).astype(np.float32)


def _sprite(g: Grid, od: np.ndarray, cover: np.ndarray, kind: str, z: float) -> Sprite:
    return Sprite(g.y0, g.x0, od.astype(np.float32), cover.astype(np.float32), kind, z)


def _paint(*layers: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Sum of density map × stain vector over layers: the patch's optical density."""
    out = None
    for dens, stain in layers:
        term = dens[..., None] * stain[None, None, :]
        out = term if out is None else out + term
    return out


def _nucleus(
    g: Grid,
    outline: Outline,
    tex: Textures,
    rng: np.random.Generator,
    density: float,
    chromatin: Sequence[tuple[str, float]],
    rim: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Nuclear coverage and hematoxylin density with chromatin texture and a membrane rim."""
    cov, q = outline.cover(g, soft=0.7)
    dens = np.full(g.shape, density, np.float32)
    for grain, amount in chromatin:
        dens += amount * density * tex.window(getattr(tex, grain), g.shape, rng)
    if rim:
        dens += rim * np.clip((q - 0.72) / 0.2, 0, 1) * (q < 1.05)
    return cov, np.maximum(dens, 0.05) * cov


def _clip_by_neighbours(
    g: Grid, cy: float, cx: float, r: float, others: np.ndarray, gap: float = 0.8
) -> np.ndarray:
    """Soft half-plane cut towards each touching neighbour: flat contact faces (nuclear moulding)."""
    keep = np.ones(g.shape, np.float32)
    for oy, ox, orad in others:
        vy, vx = oy - cy, ox - cx
        d = float(np.hypot(vy, vx))
        if d < 1e-3 or d > r + orad + 2:
            continue
        t = d * r / (r + orad) - gap / 2  # contact line, shared in proportion to the radii
        proj = (g.dy * vy + g.dx * vx) / d
        keep *= np.clip(t - proj + 0.5, 0, 1)
    return keep


# ---------------------------------------------------------------- malignant cells


def scc_cell(rng: np.random.Generator, st: Stains, tex: Textures, cy: float, cx: float, z: float) -> Sprite:
    """Keratinising squamous carcinoma: big angular, spindle or tadpole cell, orange cytoplasm, ink-dark nucleus."""
    r = rng.uniform(22, 36)
    form = rng.choice(["polygon", "spindle", "tadpole"], p=[0.5, 0.25, 0.25])
    if form == "polygon":
        body = random_outline(rng, r, (1.1, 1.9), wobble=0.03, polygon=int(rng.integers(5, 8)))
    elif form == "spindle":
        body = random_outline(rng, r * 0.85, (2.6, 4.5), wobble=0.03, polygon=4)
        body.poly_ang = np.sort(np.array([-np.pi, -np.pi / 2, 0, np.pi / 2]) + rng.uniform(-0.15, 0.15, 4))
        body.poly_rad = np.array([1.1, 0.8, 1.1, 0.8]) * rng.uniform(0.9, 1.1, 4)
    else:
        body = random_outline(rng, r * 0.85, (1.1, 1.5), wobble=0.05)
    tail = None
    if form == "tadpole":
        tlen = r * rng.uniform(1.6, 2.4)
        tail = Outline(radius=tlen / 2.8, aspect=rng.uniform(6, 9), angle=body.angle)
        off = r * 0.8 * np.sqrt(body.aspect) + tlen * 0.45
        toff = (off * np.sin(body.angle), off * np.cos(body.angle))
    half = max(body.reach(), (off + tail.reach()) if tail is not None else 0)
    g = grid_around(cy, cx, half)
    cyto, q = body.cover(g, soft=0.6)
    if tail is not None:
        cyto = np.maximum(cyto, tail.cover(g.shifted(*toff), soft=0.6)[0])
    keratin = form != "polygon" or rng.random() < 0.7  # spindles and tadpoles are keratinised
    if keratin:
        w = rng.uniform(0.45, 1.0)
        stain = st.mix(orange=w, eosin=1 - w)
        dens = rng.uniform(0.85, 1.35)
    else:  # non-keratinising: dense hard cyanophilic cytoplasm
        stain = st.mix(green=0.85, eosin=0.15)
        dens = rng.uniform(0.7, 0.95)
    streak = tex.window(tex.medium, g.shape, rng)
    cyto_d = cyto * dens * (1 + 0.12 * streak + 0.12 * np.clip(1 - q, 0, 1))
    rn = r * rng.uniform(0.28, 0.42)
    pyknotic = rng.random() < 0.2
    if pyknotic:
        rn *= 0.75
    nuc = random_outline(rng, rn, (1.1, 1.7), wobble=0.14, kmax=6, angle=body.angle + rng.normal(0, 0.3))
    off = rng.uniform(0, 0.25) * r
    a = rng.uniform(0, 2 * np.pi)
    ng = g.shifted(off * np.sin(a), off * np.cos(a))
    ncov, nd = _nucleus(ng, nuc, tex, rng, rng.uniform(1.9, 2.5) * (1.25 if pyknotic else 1),
                        [("coarse", 0.10), ("medium", 0.08)])
    od = _paint((cyto_d, stain), (nd, st.hema))
    return _sprite(g, od, np.maximum(cyto, ncov), "SCC", z)


def ac_cell(
    rng: np.random.Generator, st: Stains, tex: Textures, cy: float, cx: float, z: float,
    out_dir: Optional[float] = None, r: Optional[float] = None, others: Optional[np.ndarray] = None,
) -> Sprite:
    """Adenocarcinoma cell: pale blue-green vacuolated cytoplasm, round eccentric nucleus with nucleolus."""
    r = rng.uniform(13, 19) if r is None else r
    body = random_outline(rng, r, (1.0, 1.35), wobble=0.05)
    g = grid_around(cy, cx, body.reach())
    cyto, q = body.cover(g, soft=0.9)
    if others is not None and len(others):  # cells in a 3-D ball press softly, overlap stays
        cyto *= np.maximum(_clip_by_neighbours(g, cy, cx, r * 1.25, others, gap=-4.0), 0.0)
    foam = np.clip(tex.window(tex.fine, g.shape, rng), -1, 2)
    dens = rng.uniform(0.22, 0.36) * (1 + 0.25 * foam)
    a = rng.uniform(0, 2 * np.pi) if out_dir is None else out_dir + rng.normal(0, 0.35)
    off = r * rng.uniform(0.32, 0.5)
    ny, nx = off * np.sin(a), off * np.cos(a)
    for _ in range(int(rng.integers(1, 6))):  # mucin vacuoles, away from the nucleus
        vr = r * rng.uniform(0.1, 0.3)
        va = a + np.pi + rng.normal(0, 0.9)
        vd = rng.uniform(0.1, 0.55) * r
        hole = _disc(g, vd * np.sin(va), vd * np.cos(va), vr)
        ring = _disc(g, vd * np.sin(va), vd * np.cos(va), vr + 1.2) - hole
        dens = dens * (1 - 0.8 * hole) + 0.12 * ring
    cyto_d = cyto * dens
    rn = r * rng.uniform(0.42, 0.55)
    nuc = random_outline(rng, rn, (1.0, 1.3), wobble=0.04)
    ng = g.shifted(ny, nx)
    ncov, nd = _nucleus(ng, nuc, tex, rng, rng.uniform(0.65, 0.9), [("fine", 0.18), ("medium", 0.08)], rim=0.55)
    nucleoli = np.zeros(g.shape, np.float32)
    for _ in range(int(rng.integers(1, 3))):
        d = rn * rng.uniform(0, 0.4)
        b = rng.uniform(0, 2 * np.pi)
        nucleoli = np.maximum(nucleoli, _disc(ng, d * np.sin(b), d * np.cos(b), rng.uniform(1.6, 2.6)))
    od = _paint((cyto_d, st.mix(green=0.9, eosin=0.1)), (nd, st.hema), (nucleoli * 0.9, st.hema), (nucleoli * 0.9, st.eosin))
    return _sprite(g, od, np.maximum(cyto, ncov), "AC", z)


def sclc_cell(
    rng: np.random.Generator, st: Stains, tex: Textures, cy: float, cx: float, z: float, r: float,
    angle: float, others: np.ndarray,
) -> Sprite:
    """Small-cell carcinoma: scant cytoplasm, salt-and-pepper nucleus moulded against its neighbours."""
    nuc = random_outline(rng, r * 0.9, (1.1, 1.6), wobble=0.06, angle=angle + rng.normal(0, 0.4))
    body = Outline(nuc.radius * 1.13, nuc.aspect, nuc.angle, nuc.harm_k, nuc.harm_a, nuc.harm_p)
    g = grid_around(cy, cx, body.reach())
    keep = _clip_by_neighbours(g, cy, cx, r, others)
    cyto = body.cover(g, soft=0.7)[0] * keep
    ncov, q = nuc.cover(g, soft=0.6)
    ncov = ncov * _clip_by_neighbours(g, cy, cx, r, others, gap=2.0)
    fine = tex.window(tex.fine, g.shape, rng)
    base = rng.uniform(1.05, 1.35)
    dens = base * (1 + 0.30 * fine) + 0.7 * np.clip(fine - 1.0, 0, None)  # fine dark specks: "pepper"
    dens = np.maximum(dens, 0.3) * ncov
    od = _paint((cyto * rng.uniform(0.12, 0.2), st.mix(green=0.8, eosin=0.2)), (dens, st.hema))
    return _sprite(g, od, cyto, "SCLC", z)


def nos_cell(rng: np.random.Generator, st: Stains, tex: Textures, cy: float, cx: float, z: float) -> Sprite:
    """Non-small-cell carcinoma NOS: big atypical cell, amphophilic cytoplasm, coarse irregular nucleus."""
    r = rng.uniform(22, 31)
    body = random_outline(rng, r, (1.0, 1.6), wobble=0.09, polygon=int(rng.choice([0, 0, 6, 7])))
    g = grid_around(cy, cx, body.reach())
    cyto, q = body.cover(g, soft=0.8)
    gran = tex.window(tex.medium, g.shape, rng)
    green = rng.uniform(0.45, 0.7)
    cyto_d = cyto * rng.uniform(0.42, 0.62) * (1 + 0.15 * gran)
    nd_total = np.zeros(g.shape, np.float32)
    ncov_total = np.zeros(g.shape, np.float32)
    nucleoli = np.zeros(g.shape, np.float32)
    n_nuclei = 2 if rng.random() < 0.15 else 1
    a0 = rng.uniform(0, 2 * np.pi)
    for k in range(n_nuclei):
        rn = r * rng.uniform(0.36, 0.48) / (1.25 if n_nuclei == 2 else 1)
        nuc = random_outline(rng, rn, (1.0, 1.5), wobble=0.12, kmax=6)
        off = r * (rng.uniform(0, 0.2) if n_nuclei == 1 else 0.4)
        a = a0 + k * np.pi
        ng = g.shifted(off * np.sin(a), off * np.cos(a))
        ncov, nd = _nucleus(ng, nuc, tex, rng, rng.uniform(1.15, 1.5), [("coarse", 0.22), ("medium", 0.15)], rim=0.3)
        nd_total = np.maximum(nd_total, nd)
        ncov_total = np.maximum(ncov_total, ncov)
        if rng.random() < 0.7:  # a macronucleolus
            d, b = rn * rng.uniform(0, 0.35), rng.uniform(0, 2 * np.pi)
            nucleoli = np.maximum(nucleoli, _disc(ng, d * np.sin(b), d * np.cos(b), rng.uniform(2.0, 3.2)))
    od = _paint((cyto_d, st.mix(green=green, eosin=1 - green)), (nd_total, st.hema), (nucleoli * 1.2, st.eosin), (nucleoli * 0.8, st.hema))
    return _sprite(g, od, np.maximum(cyto, ncov_total), "NSCLC", z)


# ---------------------------------------------------------------- benign cells (never annotated)


def lymphocyte(rng: np.random.Generator, st: Stains, tex: Textures, cy: float, cx: float, z: float) -> Sprite:
    """Small round cell, a dark round nucleus and a thin rim: the SCLC look-alike without moulding."""
    r = rng.uniform(5.0, 6.5)
    body = random_outline(rng, r, (1.0, 1.12), wobble=0.03)
    g = grid_around(cy, cx, body.reach())
    cyto = body.cover(g)[0]
    nuc = Outline(r * rng.uniform(0.78, 0.88), body.aspect, body.angle, body.harm_k, body.harm_a, body.harm_p)
    ng = g.shifted(rng.normal(0, 0.5), rng.normal(0, 0.5))
    ncov, nd = _nucleus(ng, nuc, tex, rng, rng.uniform(1.7, 2.2), [("medium", 0.06)])
    od = _paint((cyto * 0.15, st.mix(green=1.0)), (nd, st.hema))
    return _sprite(g, od, cyto, "lymphocyte", z)


def neutrophil(rng: np.random.Generator, st: Stains, tex: Textures, cy: float, cx: float, z: float) -> Sprite:
    """Granular pale cell whose nucleus is 2-5 dark lobes joined by thin strands."""
    r = rng.uniform(8.0, 10.0)
    body = random_outline(rng, r, (1.0, 1.15), wobble=0.04)
    g = grid_around(cy, cx, body.reach())
    cyto = body.cover(g)[0]
    gran = tex.window(tex.fine, g.shape, rng)
    n = int(rng.integers(2, 6))
    a0 = rng.uniform(0, 2 * np.pi)
    arc = rng.uniform(2.0, 4.0)
    angs = a0 + np.linspace(0, arc, n)
    rad = r * 0.45
    lobes = np.zeros(g.shape, np.float32)
    pts = []
    for a in angs:
        py, px = rad * np.sin(a) + rng.normal(0, 0.6), rad * np.cos(a) + rng.normal(0, 0.6)
        pts.append((py, px))
        lobes = np.maximum(lobes, _disc(g, py, px, rng.uniform(2.2, 3.1)))
    for (y1, x1), (y2, x2) in zip(pts[:-1], pts[1:]):
        for t in np.linspace(0.2, 0.8, 4):
            lobes = np.maximum(lobes, 0.8 * _disc(g, y1 + t * (y2 - y1), x1 + t * (x2 - x1), 0.9))
    od = _paint((cyto * 0.14 * (1 + 0.3 * gran), st.mix(eosin=0.6, green=0.4)), (lobes * rng.uniform(1.6, 2.0), st.hema))
    return _sprite(g, od, cyto, "neutrophil", z)


def red_cell(rng: np.random.Generator, st: Stains, tex: Textures, cy: float, cx: float, z: float) -> Sprite:
    """Anucleate orange-red disc with a paler biconcave centre."""
    r = rng.uniform(6.2, 7.6)
    body = random_outline(rng, r, (1.0, 1.15), wobble=0.02)
    g = grid_around(cy, cx, body.reach())
    cov, q = body.cover(g, soft=0.9)
    dens = rng.uniform(0.3, 0.5) * (1 - 0.45 * np.exp(-(q / 0.45) ** 2)) * cov
    w = rng.uniform(0.3, 0.8)
    return _sprite(g, _paint((dens, st.mix(eosin=w, orange=1 - w))), cov, "red_cell", z)


def macrophage(rng: np.random.Generator, st: Stains, tex: Textures, cy: float, cx: float, z: float) -> Sprite:
    """Alveolar macrophage: foamy cytoplasm, small bean nucleus, often carbon or haemosiderin granules."""
    r = rng.uniform(11, 16)
    body = random_outline(rng, r, (1.0, 1.3), wobble=0.06)
    g = grid_around(cy, cx, body.reach())
    cyto, q = body.cover(g)
    foam = tex.window(tex.fine, g.shape, rng)
    dens = cyto * rng.uniform(0.16, 0.26) * (1 + 0.35 * foam)
    a = rng.uniform(0, 2 * np.pi)
    off = r * 0.4
    nuc = random_outline(rng, r * 0.3, (1.3, 1.8), wobble=0.08, angle=a + np.pi / 2)
    ncov, nd = _nucleus(g.shifted(off * np.sin(a), off * np.cos(a)), nuc, tex, rng, 1.1, [("fine", 0.15)])
    pigment = np.zeros(g.shape, np.float32)
    if rng.random() < 0.6:
        speck = tex.window(tex.fine, g.shape, rng)
        pigment = np.clip(speck - 1.3, 0, None) * cyto * rng.uniform(0.8, 1.6)
    od = _paint((dens, st.mix(green=0.6, eosin=0.4)), (nd, st.hema), (pigment, st.pigment))
    return _sprite(g, od, np.maximum(cyto, ncov), "macrophage", z)


def squamous_cell(rng: np.random.Generator, st: Stains, tex: Textures, cy: float, cx: float, z: float) -> Sprite:
    """Benign superficial squamous cell (oral contamination): huge thin polygon, tiny pyknotic nucleus.

    The SCC look-alike by colour: what tells them apart is the nucleus, small and regular here.
    """
    r = rng.uniform(32, 46)
    body = random_outline(rng, r, (1.0, 1.4), wobble=0.02, polygon=int(rng.integers(5, 8)))
    g = grid_around(cy, cx, body.reach())
    cyto, q = body.cover(g, soft=0.6)
    fold = tex.window(tex.coarse, g.shape, rng)
    w = rng.uniform(0.0, 1.0)
    stain = st.mix(eosin=w * 0.7, orange=w * 0.3, green=1 - w)
    dens = cyto * rng.uniform(0.2, 0.35) * (1 + 0.2 * fold)
    nuc = random_outline(rng, rng.uniform(2.8, 3.8), (1.0, 1.2), wobble=0.03)
    ncov, nd = _nucleus(g.shifted(rng.normal(0, 3), rng.normal(0, 3)), nuc, tex, rng, 2.2, [])
    return _sprite(g, _paint((dens, stain), (nd, st.hema)), np.maximum(cyto, ncov), "squamous", z)


def columnar_cell(
    rng: np.random.Generator, st: Stains, tex: Textures, cy: float, cx: float, z: float, angle: float,
    half_len: Optional[float] = None, half_width: Optional[float] = None,
) -> Sprite:
    """Ciliated bronchial cell: tapering basal tail, basal oval nucleus, flat terminal plate, cilia.

    The terminal bar and cilia are the cytopathologist's proof of a benign cell, so they are drawn.
    """
    L = rng.uniform(26, 36) if half_len is None else half_len
    W = rng.uniform(6.0, 8.5) if half_width is None else half_width
    cil = rng.uniform(6, 10)
    g = grid_around(cy, cx, L + cil + 2)
    c, s = np.cos(angle), np.sin(angle)
    u = g.dx * c + g.dy * s  # along the cell, + towards the lumen (apex)
    v = -g.dx * s + g.dy * c + rng.normal(0, 0.004) * (u + L) ** 2  # a slight bend of the tail
    t = np.clip((u + L) / (2 * L), 0, 1)
    hw = W * (0.22 + 0.78 * np.clip(t / rng.uniform(0.45, 0.65), 0, 1) ** 0.7)
    a, b = hw - np.abs(v), L - np.abs(u)
    edge = -1.2 * np.logaddexp(-a / 1.2, -b / 1.2)  # smooth minimum: rounded apical corners
    cyto = np.clip(edge / 0.8 + 0.5, 0, 1).astype(np.float32)
    plate = cyto * np.clip(1.0 - (L - u) / 2.2, 0, 1)
    across = np.abs(v) < W * 0.95
    period = rng.uniform(1.5, 2.1)
    phase = rng.uniform(0, 2 * np.pi)
    hair = (0.5 + 0.5 * np.cos(2 * np.pi * v / period + phase)) ** 2
    cilia = across * (u > L) * np.clip(1 - (u - L) / cil, 0, 1) * hair * rng.uniform(0.5, 0.8)
    un = -L * rng.uniform(0.05, 0.35)
    hw_n = W * (0.22 + 0.78 * min((un + L) / (2 * L) / 0.55, 1.0) ** 0.7)
    along, across_n = rng.uniform(5.5, 7.5), min(0.75 * hw_n, 4.5)
    nuc = Outline(float(np.sqrt(along * across_n)), float(along / across_n), angle,
                  np.array([2]), np.array([0.02]), np.array([0.0]))
    ncov, nd = _nucleus(g.shifted(un * s, un * c), nuc, tex, rng, rng.uniform(0.95, 1.2), [("fine", 0.14)], rim=0.2)
    fine = tex.window(tex.fine, g.shape, rng)
    od = _paint(
        (cyto * rng.uniform(0.16, 0.3) * (1 + 0.15 * fine), st.mix(green=rng.uniform(0.6, 0.9), eosin=0.3)),
        (nd, st.hema),
        (plate * 0.45 + cilia, st.mix(eosin=0.7, green=0.3)),
        (plate * 0.3 + cilia * 0.4, st.hema),
    )
    return _sprite(g, od, cyto, "columnar", z)
