"""``cytofuse sweep``: one short segmentation training per value of one config option, side by side.

The papers this project builds on choose the U-Net's learning rate by a small sweep and report each
run's validation Dice and adapted Rand error in one table; this reproduces that for any dotted
option (``optimizer.lr``, ``model.base_width``, ``data.scale`` ...). Each value trains with the
segmentation stage's own :func:`segmentation.train.train_segmentation` (no second loop) into
``OUT/<param>=<value>/``; a run that finished (``done.json``, written by
:func:`experiments.stages.run_stage`) is reused, one killed mid-way resumes from its ``last.ckpt``.
After every run the table is rewritten, so a long sweep can be read while it goes:

    OUT/sweep.csv   one row per value: best val Dice, IoU and Rand error at that epoch, losses, minutes
    OUT/sweep.md    the same as a markdown table
    OUT/sweep.png   Dice and Rand error against the value (log x axis for learning rates)
"""
from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import pandas as pd

from cytocore.atomic import write_text, write_with
from cytocore.config import parse_value, set_path
from cytocore.errors import CytoFuseError

log = logging.getLogger("cytofuse")

PathLike = Union[str, Path]
COLUMNS = ["param", "value", "best_val_dice", "best_epoch", "val_iou", "val_rand_error", "final_val_loss",
           "final_train_loss", "epochs", "minutes", "run"]


@dataclass
class SweepValue:
    """One value of the swept option: as typed (names the run folder) and as parsed (goes in the config)."""

    text: str
    value: Any


def parse_values(text: str) -> list[SweepValue]:
    """``"1e-2,1e-3"`` → values parsed like ``--set`` does (YAML scalars, ``1e-3`` as a float)."""
    parts = [p.strip() for p in str(text).split(",")]
    if not parts or any(not p for p in parts):
        raise CytoFuseError(f"--values {text!r}: expected values separated by commas, e.g. 1e-2,1e-3,1e-4")
    if len(set(parts)) != len(parts):
        raise CytoFuseError(f"--values {text!r}: a value is listed twice")
    return [SweepValue(p, parse_value(p)) for p in parts]


def run_name(param: str, value: SweepValue) -> str:
    """The run folder's name, ``optimizer.lr=1e-3``, safe on every file system."""
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", f"{param}={value.text}")


def run_config(cfg: dict, param: str, value: Any, data: Optional[PathLike], budget_minutes: Optional[float]) -> dict:
    """The segmentation config of one run: ``cfg`` with ``param`` set (an unknown option is an error)."""
    run_cfg = set_path(cfg, param, value)
    if data is not None:
        run_cfg["data"]["path"] = str(Path(data).resolve())
    if budget_minutes is not None:
        run_cfg["train"]["time_budget_minutes"] = float(budget_minutes)
    return run_cfg


def summarise_run(param: str, value: SweepValue, folder: Path, done: dict) -> dict:
    """The table row of a finished run, from its ``state.json`` history (every epoch's validation)."""
    state_path = folder / "state.json"
    history = json.loads(state_path.read_text(encoding="utf-8")).get("history", []) if state_path.is_file() else []
    row: dict[str, Any] = {"param": param, "value": value.text, "epochs": len(history),
                           "minutes": float(done.get("minutes", math.nan)), "run": folder.name}
    dice = np.array([float(h.get("val_dice", math.nan)) for h in history], np.float64)
    if history and np.isfinite(dice).any():
        best = int(np.nanargmax(dice))
        row.update(best_val_dice=float(dice[best]), best_epoch=int(history[best].get("epoch", best + 1)),
                   val_iou=float(history[best].get("val_iou", math.nan)),
                   val_rand_error=float(history[best].get("val_rand_error", math.nan)))
    if history:
        row["final_val_loss"] = float(history[-1].get("val_loss", math.nan))
        row["final_train_loss"] = float(history[-1].get("train_loss", math.nan))
    return {c: row.get(c, math.nan) for c in COLUMNS}


# ------------------------------------------------------------------------------------------ outputs


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.{digits}f}"
    return str(v)


def markdown_table(table: pd.DataFrame, param: str, note: str = "") -> str:
    """The sweep as a markdown table (the best Dice in bold)."""
    best = table["best_val_dice"].astype(float)
    top = best.idxmax() if best.notna().any() else None
    lines = [f"# Sweep of `{param}` (segmentation U-Net)", ""]
    if note:
        lines += [note, ""]
    lines += [f"| {param} | best val Dice | val IoU | val adapted Rand error | final val loss | final train loss | epochs | minutes |",
              "|---|---|---|---|---|---|---|---|"]
    for i, r in table.iterrows():
        dice = _fmt(r["best_val_dice"])
        if i == top:
            dice = f"**{dice}**"
        lines.append(f"| {r['value']} | {dice} | {_fmt(r['val_iou'])} | {_fmt(r['val_rand_error'])} | "
                     f"{_fmt(r['final_val_loss'])} | {_fmt(r['final_train_loss'])} | {_fmt(r['epochs'])} | {_fmt(r['minutes'], 1)} |")
    lines += ["", "IoU and Rand error are those of the epoch with the best validation Dice (the checkpoint kept as "
              "best.ckpt when `train.monitor` is val_dice); Dice and IoU are pooled over the validation pixels, the "
              "adapted Rand error (0 = perfect) compares connected components, so merged touching cells count. "
              "Final val loss: – when the stage's validation does not compute one."]
    return "\n".join(lines) + "\n"


def numeric_axis(values: Sequence[Any], param: str) -> tuple[Optional[np.ndarray], bool]:
    """``(x values, log scale)`` when every value is a number, else ``(None, False)`` (categorical axis).

    Log scale for learning rates and weight decays, and for any positive values spanning 20× or more.
    """
    if not values or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
        return None, False
    x = np.asarray(values, np.float64)
    positive = bool((x > 0).all())
    wide = positive and x.max() / x.min() >= 20
    named = param.rsplit(".", 1)[-1] in ("lr", "weight_decay")
    return x, positive and (wide or named)


def plot_sweep(table: pd.DataFrame, values: Sequence[Any], param: str, path: Path) -> None:
    """Dice and Rand error against the swept value, two panels side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, log_x = numeric_axis(list(values), param)
    labels = list(table["value"])
    positions = x if x is not None else np.arange(len(labels), dtype=np.float64)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, column, title, colour in ((axes[0], "best_val_dice", "best validation Dice (higher is better)", "tab:blue"),
                                      (axes[1], "val_rand_error", "adapted Rand error (lower is better)", "tab:red")):
        y = table[column].astype(float).to_numpy()
        order = np.argsort(positions)
        ax.plot(positions[order], y[order], "o-", color=colour)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(param)
        if log_x:
            ax.set_xscale("log")
        if x is None:
            ax.set_xticks(positions)
            ax.set_xticklabels(labels, rotation=30 if max(len(s) for s in labels) > 6 else 0)
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def write_outputs(out: Path, table: pd.DataFrame, values: Sequence[Any], param: str, note: str = "") -> None:
    write_with(out / "sweep.csv", lambda tmp: table.to_csv(tmp, index=False, float_format="%.6g"))
    write_text(out / "sweep.md", markdown_table(table, param, note))
    plot_sweep(table, values, param, out / "sweep.png")


# ------------------------------------------------------------------------------------------ sweep


def run_sweep(cfg: dict, param: str, values: Sequence[SweepValue], out_dir: PathLike, data: Optional[PathLike] = None,
              budget_minutes: Optional[float] = None, progress: bool = True) -> pd.DataFrame:
    """Train (or reuse) one run per value and write the table and plot; returns the table."""
    from segmentation.train import check_config, train_segmentation

    from .stages import run_stage

    if not values:
        raise CytoFuseError("--values: nothing to sweep")
    if budget_minutes is not None and not float(budget_minutes) > 0:
        raise CytoFuseError(f"--budget-minutes must be positive, got {budget_minutes}")
    out = Path(out_dir)
    if data is None and not cfg["data"]["path"]:
        raise CytoFuseError("no data set given: pass --data DIR or set data.path in the config")
    # every run's config is built and checked before the first trains: a typo fails in a second, not after an hour
    configs = []
    for v in values:
        run_cfg = run_config(cfg, param, v.value, data, budget_minutes)
        run_cfg["train"]["progress"] = bool(progress)
        run_cfg["out"] = str(out / run_name(param, v))
        try:
            check_config(run_cfg)
        except CytoFuseError as exc:
            raise CytoFuseError(f"{param}={v.text}: {exc}") from None
        configs.append(run_cfg)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    budget = cfg["train"]["time_budget_minutes"] if budget_minutes is None else budget_minutes
    note = (f"One segmentation training per value, same data, seed {cfg['train']['seed']} and budget "
            f"({'no time limit' if budget is None else f'{float(budget):g} min'}, at most {cfg['train']['epochs']} epochs "
            f"of {cfg['train']['steps_per_epoch']} steps); everything else as in the config.")
    for i, (v, run_cfg) in enumerate(zip(values, configs)):
        folder = Path(run_cfg["out"])
        log.info("[%d/%d] %s = %s -> %s", i + 1, len(values), param, v.text, folder)
        done = run_stage(f"{param}={v.text}", folder, run_cfg,
                         lambda c=run_cfg, f=folder: train_segmentation(c, out=f, resume=True, progress=progress))
        rows.append(summarise_run(param, v, folder, done))
        table = pd.DataFrame(rows, columns=COLUMNS)
        write_outputs(out, table, [x.value for x in values[: len(rows)]], param, note)
    log.info("wrote %s, %s and %s", out / "sweep.csv", out / "sweep.md", out / "sweep.png")
    return pd.DataFrame(rows, columns=COLUMNS)
