"""Tiny challenge-layout data sets for the reliability tests, and ways to damage them.

Written straight to disk (PNG/JPEG, CSVs) so the tests exercise the same readers a user's folder goes
through; 64-pixel images keep a MindSpore training run to a few seconds.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

CLASSES = ("A", "B")


def write_tiny_challenge(root: Path, n: int = 8, size: int = 64, seed: int = 0, jpeg: tuple[int, ...] = (),
                         healthy: tuple[int, ...] = (3,)) -> Path:
    """``n`` pale images with dark discs, masks, labels.csv, metadata.csv and splits.csv.

    Images listed in ``jpeg`` are written as JPEG, those in ``healthy`` get neither boxes nor mask
    pixels; the last third are the ``val`` split. Returns ``root``.
    """
    rng = np.random.default_rng(seed)
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:size, :size]
    labels = ["image_id,xmin,ymin,xmax,ymax," + ",".join(CLASSES)]
    meta = ["image_id,width,height"]
    splits = ["image_id,split"]
    n_val = max(2, n // 3)
    for i in range(n):
        image_id = f"im{i}"
        img = np.clip(225 + rng.normal(0, 4, (size, size, 3)), 0, 255).astype(np.uint8)
        mask = np.zeros((size, size), np.uint8)
        if i not in healthy:
            for k in range(2):
                r = float(rng.uniform(5, 8))
                cy, cx = rng.uniform(r + 2, size - r - 2, 2)
                disc = (yy + 0.5 - cy) ** 2 + (xx + 0.5 - cx) ** 2 <= r * r
                img[disc] = (110, 60, 140) if k == 0 else (150, 50, 70)
                mask[disc] = 255
                box = np.array([cx - r, cy - r, cx + r, cy + r]) / size
                onehot = "1,0" if k == 0 else "0,1"
                labels.append(f"{image_id}," + ",".join(f"{v:.5f}" for v in box) + f",{onehot}")
        suffix = ".jpg" if i in jpeg else ".png"
        Image.fromarray(img).save(root / "images" / f"{image_id}{suffix}", quality=95)
        Image.fromarray(mask).save(root / "masks" / f"{image_id}.png")
        meta.append(f"{image_id},{size},{size}")
        splits.append(f"{image_id},{'val' if i >= n - n_val else 'train'}")
    for name, lines in (("labels.csv", labels), ("metadata.csv", meta), ("splits.csv", splits)):
        (root / name).write_text("\n".join(lines) + "\n")
    return root


def truncate(path: Path, keep: float = 0.5) -> Path:
    """Cut a file to ``keep`` of its bytes (a copy interrupted half-way)."""
    data = path.read_bytes()
    path.write_bytes(data[: max(1, int(len(data) * keep))])
    return path


def image_path(root: Path, image_id: str) -> Optional[Path]:
    found = sorted((root / "images").glob(f"{image_id}.*"))
    return found[0] if found else None
