"""The training stages of an experiment run: each stage's config, and reuse of a finished stage.

Shared by ``cytofuse compare`` (:mod:`experiments.compare`), ``targets-compare``
(:mod:`experiments.weak_supervision`) and ``sweep``: a stage's config is its own defaults ← the
experiment's ``seg``/``cls``/``baseline`` section ← the experiment's data, seed and budget;
:func:`run_stage` trains it once into its folder (``done.json``) and refuses to reuse a run
trained with another config (:func:`config_hash`).
"""
from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from cytocore.atomic import write_json
from cytocore.config import merge, read_yaml
from cytocore.errors import CytoFuseError
from cytocore.hashing import fingerprint, sha256_file

log = logging.getLogger("cytofuse")

PathLike = Union[str, Path]

REPO_ROOT = Path(__file__).resolve().parents[1]


CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULTS = CONFIG_DIR / "compare_defaults.yaml"


#: Keys left out of a stage's config fingerprint: they change how a run looks, not what it learns.
NOT_FINGERPRINTED = (("train", "progress"), ("train", "time_budget_minutes"), ("out",))

#: Options added after runs were trained, left out of the fingerprint while at the value that
#: reproduces the old behaviour: a run folder trained before an option existed stays resumable.
LATER_OPTIONS = {("proposals", "match"): "iop", ("proposals", "iou"): 0.5}


def repo_path(path: PathLike) -> Path:
    """Config paths are relative to the repository root (``../shared/datasets/...``), so a config
    means the same thing whatever the working directory."""
    p = Path(os.path.expanduser(str(path)))
    return p if p.is_absolute() else (REPO_ROOT / p).resolve()


def _without(cfg: Mapping[str, Any], paths: Sequence[tuple[str, ...]]) -> dict:
    out = copy.deepcopy(dict(cfg))
    for path in paths:
        node = out
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
            if node is None:
                break
        if isinstance(node, dict):
            node.pop(path[-1], None)
    return out


def config_hash(cfg: Mapping[str, Any]) -> str:
    at_old_behaviour = [path for path, value in LATER_OPTIONS.items() if _get(cfg, path) == value]
    return fingerprint(_without(cfg, NOT_FINGERPRINTED + tuple(at_old_behaviour)))


def _get(cfg: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = cfg
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return node


def _section(cfg: Mapping[str, Any], name: str, load: Callable[[Optional[Path]], dict],
             default: Optional[Path] = None) -> tuple[dict, dict, str]:
    """A stage section as ``(its base config, its override keys, where the base came from)``.

    The base is ``load`` of the section's ``config:`` file (resolved; without one, ``default``), or
    the mapping :func:`freeze_stage_configs` already read from it.
    """
    section = dict(cfg.get(name) or {})
    base = section.pop("config", None)
    if isinstance(base, Mapping):
        return copy.deepcopy(dict(base)), section, f"{name}.config"
    path = repo_path(base) if base else default
    return load(path), section, str(path) if path else f"{name} defaults"


def _baseline_section(cfg: Mapping[str, Any]) -> tuple[dict, dict, str]:
    """The single-stage sections: ``baseline.config``, else segmentation/configs/baseline.yaml."""
    from .baseline import baseline_config_path

    return _section(cfg, "baseline", read_yaml, baseline_config_path())


def freeze_stage_configs(cfg: Mapping[str, Any]) -> dict:
    """``cfg`` with every stage's config files read now: each ``seg``/``cls``/``baseline`` section's
    ``config:`` becomes the mapping it stands for (the stage's defaults ← its file), ``infer`` the full
    fusion config.

    A comparison runs for 20-60 minutes and starts its stages one after another (side by side: in
    worker processes that read ``compare_config.yaml``). Reading the YAML files as each stage starts
    let an edit or a branch switch in the checkout mid-run give one run two versions of its configs,
    and ``compare_config.yaml`` did not say which ran; frozen at the start, it does.
    """
    from classification.train import load_cls_config
    from fusion.pipeline import load_fusion_config
    from segmentation.train import load_seg_config

    out = copy.deepcopy(dict(cfg))
    for name, load in (("seg", load_seg_config), ("cls", load_cls_config)):
        base, overrides, _ = _section(out, name, load)
        out[name] = {"config": base, **overrides}
    base, overrides, _ = _baseline_section(out)
    out["baseline"] = {"config": base, **overrides}
    out["infer"] = load_fusion_config(dict(out.get("infer") or {}))
    return out


def seg_stage_config(cfg: Mapping[str, Any], data_path: Path, budget_minutes: Optional[float]) -> dict:
    """The segmentation stage's config: its defaults ← ``seg.config`` ← ``seg`` overrides ← compare's data, seed, budget."""
    from segmentation.train import load_seg_config

    scfg, overrides, _ = _section(cfg, "seg", load_seg_config)
    if overrides:
        scfg = merge(scfg, overrides, "compare config seg")
    return _common_train_options(scfg, cfg, data_path, budget_minutes, overrides)


def baseline_stage_config(cfg: Mapping[str, Any], data_path: Path, budget_minutes: Optional[float],
                          epochs: Optional[int] = None) -> dict:
    """The baseline's config: the *segmentation stage's* config (same U-Net, patches, scale,
    augmentation, optimiser) with the single-stage sections of ``segmentation/configs/baseline.yaml``
    (or ``baseline.config``) — everything but its ``model`` and ``out`` — then ``baseline`` overrides.

    Taking the architecture from the segmentation stage keeps the comparison about the design
    (one network doing both jobs), not about a wider or deeper U-Net.
    """
    read, overrides, source = _baseline_section(cfg)
    scfg = seg_stage_config(cfg, data_path, budget_minutes)
    single = {k: v for k, v in read.items() if k not in ("model", "out")}
    bcfg = merge(scfg, single, source)
    if overrides:
        bcfg = merge(bcfg, overrides, "compare config baseline")
    if bcfg["targets"]["mode"] != "classes":
        raise CytoFuseError(f"{source}: the single-stage baseline needs targets.mode: classes, not {bcfg['targets']['mode']!r}")
    if epochs is not None:
        bcfg["train"]["epochs"] = int(epochs)
    return _common_train_options(bcfg, cfg, data_path, budget_minutes, overrides)


def cls_stage_config(cfg: Mapping[str, Any], data_path: Path, budget_minutes: Optional[float]) -> dict:
    from classification.train import load_cls_config

    ccfg, overrides, _ = _section(cfg, "cls", load_cls_config)
    if overrides:
        ccfg = merge(ccfg, overrides, "compare config cls")
    ccfg["data"]["split_fractions"] = list(cfg["data"]["split_fractions"])
    return _common_train_options(ccfg, cfg, data_path, budget_minutes, overrides)


def refuse_stage_budgets(cfg: Mapping[str, Any], source: Any) -> None:
    """A stage's own ``train.time_budget_minutes`` would be overwritten by the ``budget:`` block
    (:func:`_common_train_options`: the systems' budgets stay comparable), so it is refused when the
    config is read, not ignored minutes later."""
    for name, key in (("seg", "seg_minutes"), ("cls", "cls_minutes"), ("baseline", "baseline_minutes")):
        train = (cfg.get(name) or {}).get("train") or {}
        if isinstance(train, Mapping) and "time_budget_minutes" in train:
            raise CytoFuseError(f"{source}: {name}.train.time_budget_minutes is not read here; set budget.{key} "
                                f"(or --budget-minutes for the total) instead")


def _common_train_options(stage: dict, cfg: Mapping[str, Any], data_path: Path, budget_minutes: Optional[float],
                          own: Optional[Mapping[str, Any]] = None) -> dict:
    """What compare decides for every stage: data (for the record: the split data set is passed in),
    split names and seed, training seed, budget and progress bars.

    The training seed is the experiment's unless the stage's own section (``own``, e.g. ``--set
    cls.train.seed=1``) sets one: that retrains one stage with another seed while the others, whose
    configs are unchanged, are reused. (The experiment's ``seed`` used to overwrite it silently.)
    """
    d = cfg["data"]
    stage["data"]["path"] = str(data_path)
    stage["data"]["train_split"] = d["train_split"]
    stage["data"]["val_split"] = d["val_split"]
    stage["data"]["split_seed"] = int(d["split_seed"])
    own_seed = ((own or {}).get("train") or {}).get("seed")
    stage["train"]["seed"] = int(cfg["seed"] if own_seed is None else own_seed)
    stage["train"]["time_budget_minutes"] = None if budget_minutes is None else float(budget_minutes)
    stage["train"]["progress"] = bool(cfg["progress"])
    return stage


def infer_config(cfg: Mapping[str, Any], single_stage: bool = False, proposals: bool = False) -> dict:
    """The fusion-stage config a system runs inference with: ``infer``, and for the single-stage
    system ``single_stage_infer`` over it; with ``proposals``, what the U-Net's training-split proposals
    for the classifier are made with: ``proposals_infer`` over ``infer``."""
    from fusion.pipeline import load_fusion_config

    block = copy.deepcopy(dict(cfg.get("infer") or {}))
    for wanted, key in ((single_stage, "single_stage_infer"), (proposals, "proposals_infer")):
        if wanted and cfg.get(key):
            block = merge(block, dict(cfg[key]), key, strict=False)
    block.setdefault("runtime", {})
    block["runtime"] = {**dict(block["runtime"] or {}), "seed": int(cfg["seed"])}
    return load_fusion_config(block)


def _read_done(folder: Path) -> Optional[dict]:
    path = folder / "done.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return None


def portable(cfg: Any, root: Path) -> Any:
    """``cfg`` with every path inside the run folder ``root`` written relative to it (``<run>/...``).

    A stage's config names files the run itself made (the proposals table the classifier learns
    from); with absolute paths in its fingerprint a run folder moved or copied elsewhere would refuse
    to reuse its own finished stages.
    """
    if isinstance(cfg, Mapping):
        return {key: portable(value, root) for key, value in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [portable(value, root) for value in cfg]
    if isinstance(cfg, str):
        prefix = str(root).rstrip("/\\") + os.sep
        if cfg.startswith(prefix):
            return "<run>/" + Path(cfg[len(prefix):]).as_posix()
    return cfg


def _stage_checkpoints(done: dict, folder: Path) -> dict:
    """``done`` with its checkpoints found in ``folder`` when the run folder was moved or copied.

    ``done.json`` records absolute paths (for people reading it); the checkpoints are written beside
    it, so a file of that name in the folder is the one (an old location that still exists may hold
    another run's files by now).
    """
    out = dict(done)
    for key in ("best_checkpoint", "last_checkpoint"):
        recorded = out.get(key)
        if recorded and (folder / Path(recorded).name).is_file():
            out[key] = str(folder / Path(recorded).name)
    return out


def _check_inputs(name: str, folder: Path, done: Mapping[str, Any], inputs: Mapping[str, Path]) -> None:
    """Refuse a finished stage whose recorded input files differ from today's (see :func:`run_stage`)."""
    recorded = done.get("inputs") or {}
    for key, path in inputs.items():
        if key not in recorded:
            log.warning("    %s: the finished %s run records no %s hash (an older run folder): reused without "
                        "checking that %s is what it learned from", folder, name, key, path)
        elif recorded[key] != sha256_file(path):
            raise CytoFuseError(f"{folder}: this {name} stage learned from another {key} than {path} holds now "
                                f"(made with other settings since); delete {folder} to retrain it, or use another --out")


def run_stage(name: str, folder: Path, stage_cfg: dict, train: Callable[[], Any],
              derived: Sequence[tuple[str, ...]] = (), inputs: Optional[Mapping[str, Path]] = None) -> dict:
    """Train one stage, or reuse it when ``done.json`` says it finished with this config.

    A run without ``done.json`` (killed mid-way) is resumed from its ``last.ckpt`` by the loop. The
    fingerprint sees paths inside the run folder relative to it (:func:`portable`), so a finished
    run folder can be moved; one written before that (absolute paths) is still recognised.
    ``derived`` keys were computed from other stages' measured minutes (the baseline's ``auto``
    epoch cap): they are left out of the fingerprint, so retraining the classifier alone does not
    make a finished baseline unusable (its ``done.json`` keeps the budget it really had).
    ``inputs`` are files an earlier phase of the run made for this stage to learn from (the
    segmenter's proposals the classifier trains on): the config names them by path only, so their
    sha256 is kept in ``done.json`` and a stage whose inputs have changed since is refused, not reused
    (new post-processing hypotheses re-make the proposals).
    """
    from .baseline import images_seen

    here = portable(stage_cfg, folder.parent)
    digest = config_hash(_without(here, derived))
    done = _read_done(folder)
    if done is not None:
        done = _stage_checkpoints(done, folder)
    if done is not None and Path(done.get("best_checkpoint", "")).is_file():
        if done.get("config_hash") not in (digest, config_hash(here), config_hash(stage_cfg)):
            raise CytoFuseError(
                f"{folder}: this {name} stage was trained with another config (fingerprint {done.get('config_hash')} "
                f"!= {digest}); delete {folder} to retrain it, or use another --out"
            )
        _check_inputs(name, folder, done, inputs or {})
        log.info("    reusing the finished %s run in %s (%.1f min, %d epochs)", name, folder, done["minutes"], done["epochs"])
        return done
    result = train()
    done = {
        "stage": name,
        "best_checkpoint": str(result.best_checkpoint),
        "last_checkpoint": str(result.last_checkpoint),
        "minutes": round(float(result.minutes), 3),
        "epochs": len(result.history),
        "samples": images_seen(result.history),
        "best_value": result.best_value,
        "monitor": stage_cfg["train"]["monitor"],
        "budget_minutes": stage_cfg["train"]["time_budget_minutes"],
        "epochs_planned": int(stage_cfg["train"]["epochs"]),
        "config_hash": digest,
        **({"inputs": {key: sha256_file(path) for key, path in inputs.items()}} if inputs else {}),
    }
    write_json(folder / "done.json", done)
    log.info("    %s trained: %d epochs, %.1f min, best %s = %s", name, done["epochs"], done["minutes"], done["monitor"],
             "n/a" if done["best_value"] is None else f"{done['best_value']:.4f}")
    return done
