"""The one training loop shared by the segmentation stage, the classifier and the baseline.

A stage describes *what* to train as a :class:`TrainTask` (network, loss, batches per epoch,
validation); this module owns *how*: a compiled (graph-mode) train step, AdamW/Adam with a cosine
schedule, per-epoch validation (from ``validate_from`` on), an optional average of the weights
(``ema``), best/last checkpoints, a CSV log, tqdm progress with ETA, a config snapshot, and an exact
``resume`` after the process was killed.

Why resume is exact: the optimiser's moments and step counter are saved with the weights in
``last.ckpt``; the learning rate is a function of that counter; and each epoch's batches and
augmentations are drawn from an RNG seeded by ``(seed, epoch)``, so epoch *e* sees the same data
whether or not the process died before it.

Time budgets: "train for N minutes" is how users and the baseline comparison state compute, so with
``time_budget_minutes`` the schedule's progress is the larger of steps done and budget used. The
cosine then reaches its floor when the budget ends instead of being cut off at a high learning rate.
(A budgeted run depends on machine speed, so it is not bit-reproducible; a step-limited one is.)

Several workers (started by ``msrun``, see :mod:`cytocore.distributed`): each draws its own share of
every batch from an RNG seeded by ``(seed, epoch, rank)``, the compiled step averages gradients over
the workers before the optimiser update, so every worker holds the same weights; rank 0 alone
validates and writes checkpoints, the log and ``state.json``, and its decisions (resume epoch, time
budget) are broadcast so the workers never disagree on what to run next.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable, Optional, Sequence, Union

import numpy as np

from . import distributed as dist
from . import runtime
from .atomic import write_json, write_text
from .errors import CheckpointError
from .prefetch import prefetch
from .weight_average import RawWeights, WeightAverage, restore_raw

log = logging.getLogger("cytofuse")

PathLike = Union[str, Path]
Batch = Sequence[np.ndarray]


@dataclass
class OptimConfig:
    """Optimiser and schedule settings (the ``optimizer:`` block of a stage's YAML config)."""

    name: str = "adamw"  # adamw | adam
    lr: float = 1e-3
    weight_decay: float = 1e-4
    schedule: str = "cosine"  # cosine | constant
    warmup_epochs: float = 0.0
    min_lr_ratio: float = 0.01


@dataclass
class LoopConfig:
    """How long and how to train (the ``train:`` block)."""

    epochs: int = 10
    steps_per_epoch: int = 50
    seed: int = 0
    monitor: str = "val_dice"
    monitor_mode: str = "max"  # max | min
    time_budget_minutes: Optional[float] = None  # stop when used up; the schedule follows it
    progress: bool = True
    prefetch: int = 0  # batches drawn and augmented ahead on a background thread while the step runs (0: none)
    # Training progress (0-1, as the schedule counts it) from which epochs are validated; the last
    # epoch always is. Early checkpoints, taken at a high learning rate, win on small validation
    # sets by chance more often than by merit, and their validation costs budget minutes.
    validate_from: float = 0.0
    # Per-step decay of an average of the weights (cytocore.weight_average); 0 = off. When on, the
    # average is what is validated, chosen as best.ckpt and left in last.ckpt and the network.
    ema: float = 0.0
    optimizer: OptimConfig = field(default_factory=OptimConfig)

    @classmethod
    def from_dict(cls, train: dict, optimizer: Optional[dict] = None) -> "LoopConfig":
        known = {f for f in cls.__dataclass_fields__ if f != "optimizer"}
        unknown = set(train) - known
        if unknown:
            raise ValueError(f"unknown train option(s): {', '.join(sorted(unknown))}")
        opt_known = set(OptimConfig.__dataclass_fields__)
        opt = dict(optimizer or {})
        bad = set(opt) - opt_known
        if bad:
            raise ValueError(f"unknown optimizer option(s): {', '.join(sorted(bad))}")
        loop = cls(**{k: v for k, v in train.items()}, optimizer=OptimConfig(**opt))
        if not 0.0 <= float(loop.validate_from) <= 1.0:
            raise ValueError(f"train.validate_from must be between 0 and 1, got {loop.validate_from}")
        if not 0.0 <= float(loop.ema) < 1.0:
            raise ValueError(f"train.ema must be 0 (off) or a per-step decay below 1 such as 0.99, got {loop.ema}")
        return loop


@dataclass
class TrainTask:
    """What a stage hands the loop.

    ``batches(epoch, rng)`` yields tuples ``(inputs, *targets)`` of NumPy arrays, at most
    ``steps_per_epoch`` of them, deterministic given ``rng``. ``loss_fn(outputs, *targets)`` runs inside
    the compiled step, so it must be MindSpore-traceable. ``validate(network)`` returns metrics
    (the monitored one included) computed with the network in eval mode.
    """

    network: Any
    loss_fn: Callable[..., Any]
    batches: Callable[[int, np.random.Generator], Iterable[Batch]]
    validate: Callable[[Any], dict[str, float]]
    meta: dict = field(default_factory=dict)  # stored in every checkpoint (architecture, classes...)


@dataclass
class TrainResult:
    history: list[dict[str, float]]
    best_checkpoint: Path
    last_checkpoint: Path
    best_value: Optional[float]
    minutes: float


def lr_at(progress: np.ndarray, cfg: LoopConfig, steps_done: Optional[np.ndarray] = None) -> np.ndarray:
    """Learning rate at training progress in [0, 1], warmed up over the first ``steps_done`` steps.

    The warm-up counts steps, not progress: under a time budget the first step's graph compile
    takes seconds, and counting them cut the warm-up short -- the learning rate jumped to ~70 % at
    step 2, and the demo's classifiers scored 0.78-0.79 on test instead of 0.87 (two runs each).
    """
    o = cfg.optimizer
    p = np.clip(np.asarray(progress, np.float64), 0.0, 1.0)
    if o.schedule == "constant":
        lr = np.full(p.shape, o.lr)
    elif o.schedule == "cosine":
        lo = o.lr * o.min_lr_ratio
        lr = lo + 0.5 * (o.lr - lo) * (1 + np.cos(np.pi * p))
    else:
        raise ValueError(f"unknown schedule {o.schedule!r} (cosine or constant)")
    total = max(1, cfg.epochs * cfg.steps_per_epoch)
    warm_steps = o.warmup_epochs * cfg.steps_per_epoch
    if warm_steps > 0:
        done = p * total if steps_done is None else np.asarray(steps_done, np.float64)
        lr = lr * np.minimum(1.0, (done + 1) / warm_steps)
    return lr.astype(np.float32)


def lr_table(cfg: LoopConfig) -> np.ndarray:
    """Per-step learning rates of a run that is not cut short by a time budget."""
    total = max(1, cfg.epochs * cfg.steps_per_epoch)
    return lr_at(np.arange(total) / total, cfg)


def make_optimizer(params: list, cfg: LoopConfig) -> Any:
    """AdamW/Adam whose learning rate is a parameter the train step sets before every update."""
    import mindspore as ms
    import mindspore.nn as nn

    lr = ms.Tensor(np.float32(cfg.optimizer.lr))
    name = cfg.optimizer.name.lower()
    if name == "adamw":
        return nn.AdamWeightDecay(params, learning_rate=lr, weight_decay=cfg.optimizer.weight_decay)
    if name == "adam":
        return nn.Adam(params, learning_rate=lr, weight_decay=cfg.optimizer.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer.name!r} (adamw or adam)")


def make_train_step(network: Any, loss_fn: Callable, optimizer: Any) -> Callable:
    """The compiled (graph-mode) step ``step(lr, inputs, *targets) -> loss``.

    The learning rate is an input rather than a table inside the optimiser so that a time budget
    can steer the schedule from outside the graph. With several workers the gradients (and the
    reported loss) are averaged over them inside the step.
    """
    import mindspore as ms
    import mindspore.ops as ops

    def forward(inputs, *targets):
        return loss_fn(network(inputs), *targets)

    grad_fn = ms.value_and_grad(forward, None, optimizer.parameters)
    reducer = dist.grad_reducer(optimizer.parameters)
    if reducer is not None:
        return _data_parallel_step(grad_fn, reducer, optimizer)

    @ms.jit
    def step(lr, inputs, *targets):
        loss, grads = grad_fn(inputs, *targets)
        ops.assign(optimizer.learning_rate, lr)
        optimizer(grads)
        return loss

    return step


def _data_parallel_step(grad_fn: Callable, reducer: Any, optimizer: Any) -> Callable:
    """The step of a worker: local gradients, averaged over all workers, then the same update everywhere."""
    import mindspore as ms
    import mindspore.ops as ops

    sum_all = ops.AllReduce()
    workers = float(dist.size())

    @ms.jit
    def step(lr, inputs, *targets):
        loss, grads = grad_fn(inputs, *targets)
        grads = reducer(grads)
        ops.assign(optimizer.learning_rate, lr)
        optimizer(grads)
        return sum_all(loss) / workers

    return step


def data_seed(seed: int, epoch: int) -> list[int]:
    """Seed of an epoch's batches: ``(seed, epoch)``, plus the rank when several workers share a batch."""
    return [seed, epoch, dist.rank()] if dist.active() else [seed, epoch]


def _better(value: float, best: Optional[float], mode: str) -> bool:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    if best is None:
        return True
    return value > best if mode == "max" else value < best


def _write_log(path: Path, history: list[dict]) -> None:
    keys: list[str] = []
    for row in history:
        keys += [k for k in row if k not in keys]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(history)
    write_text(path, buf.getvalue())


def _read_log(path: Path, epochs: int) -> list[dict]:
    """The first ``epochs`` rows of ``log.csv`` as numbers (an unreadable log gives no rows)."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error):
        return []

    def number(text: Optional[str]) -> Any:
        for kind in (int, float):
            try:
                return kind(text)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                pass
        return text

    return [{k: number(v) for k, v in row.items() if k is not None} for row in rows[:epochs]]


def _resume_state(state_path: Path, saved: dict, last_path: Path, log_path: Path) -> dict:
    """Where to resume: ``state.json``, or -- when it is missing or damaged -- the last checkpoint's
    own record (epoch, best, seconds, saved with the weights) and the history from ``log.csv``.

    ``state.json`` is written atomically, but a full disk or a copied run folder can still leave it
    cut short; the checkpoint holds everything needed to go on, so that costs one warning, not the run.
    """
    damage = None
    if state_path.exists():
        try:
            state = json.loads(state_path.read_text(encoding="utf-8"))
            if isinstance(state, dict) and isinstance(state.get("epoch"), int):
                return state
            damage = "not a training state"
        except (ValueError, OSError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            damage = f"{exc.__class__.__name__}: {exc}"
    loop = saved.get("loop")
    if not isinstance(loop, dict) or not isinstance(loop.get("epoch"), int):
        what = f"{state_path} is damaged ({damage})" if damage else f"{state_path} is missing"
        raise CheckpointError(f"{what} and {last_path} does not record its epoch; cannot resume: start a new run "
                              "in another --out (or restore state.json)")
    history = _read_log(log_path, int(loop["epoch"]) + 1)
    if damage:
        log.warning("%s is damaged (%s); resuming from %s (epoch %d) with the history in %s", state_path, damage,
                    last_path.name, int(loop["epoch"]) + 1, log_path.name)
    return {**loop, "history": history}


def _snapshot_config(out: Path, config: Optional[dict]) -> None:
    if config is None:
        return
    from .config import dump_yaml

    write_text(out / "config.yaml", dump_yaml(config))


@dataclass
class _Start:
    """Where a run starts: the state ``last.ckpt``/``state.json`` give back on resume, else a new run."""

    epoch: int = 0
    seconds: float = 0.0
    best: Optional[float] = None
    history: list = field(default_factory=list)
    averaged: Optional[list] = None  # the weight average last.ckpt held (its raw weights are in the network)


def _load_start(out: Path, net: Any, optimizer: Any, cfg: LoopConfig, resume: bool) -> _Start:
    last_path, state_path = out / "last.ckpt", out / "state.json"
    if resume and last_path.exists():
        params, saved = runtime.load_checkpoint(last_path)
        runtime.load_into(net, params, last_path, strict=True)
        runtime.load_into(optimizer, params, last_path, strict=False)
        averaged = restore_raw(net, params, last_path)
        state = _resume_state(state_path, saved, last_path, out / "log.csv")
        start = _Start(int(state.get("epoch", -1)) + 1, float(state.get("seconds", 0.0)), state.get("best"),
                       state.get("history", []), averaged)
        log.info("resuming %s at epoch %d/%d", out, start.epoch + 1, cfg.epochs)
        return start
    if resume:
        log.info("no %s to resume from: starting a new run", last_path)
    elif last_path.exists():
        raise CheckpointError(f"{out}: already holds a run (last.ckpt); pass --resume to continue it or choose another --out")
    return _Start()


def _agreed_start(out: Path, net: Any, optimizer: Any, cfg: LoopConfig, resume: bool) -> _Start:
    """Rank 0 reads the run folder; every other worker takes its decision, weights and optimiser state.

    So a job needs no shared disk to resume, and a refusal on rank 0 stops every worker.
    """
    if not dist.active():
        return _load_start(out, net, optimizer, cfg, resume)
    start, problem = _Start(), None
    if dist.is_main():
        try:
            start = _load_start(out, net, optimizer, cfg, resume)
        except CheckpointError as exc:
            problem = exc
    failed, epoch, seconds = dist.broadcast([problem is not None, start.epoch, start.seconds])
    if problem is not None:
        raise problem
    if failed:
        raise CheckpointError(f"{out}: rank 0 could not start the run (see its log)")
    dist.broadcast_parameters([net, optimizer])
    return start if dist.is_main() else _Start(int(epoch), float(seconds))


def train(
    task: TrainTask,
    cfg: LoopConfig,
    out_dir: PathLike,
    resume: bool = False,
    config_snapshot: Optional[dict] = None,
) -> TrainResult:
    """Train ``task.network`` in place; write ``best.ckpt``, ``last.ckpt``, ``log.csv``, ``state.json``.

    With ``resume`` and a ``last.ckpt`` in ``out_dir``, training continues after the last finished
    epoch with the same optimiser state and data order; a finished run returns at once. Under msrun
    only rank 0 writes to ``out_dir``.
    """
    import mindspore as ms
    from tqdm.auto import tqdm

    out = Path(out_dir)
    main = dist.is_main()
    net = task.network
    optimizer = make_optimizer(net.trainable_params(), cfg)
    last_path, best_path, state_path = out / "last.ckpt", out / "best.ckpt", out / "state.json"
    meta = dict(task.meta)

    start = _agreed_start(out, net, optimizer, cfg, resume)
    history, best, start_epoch, elapsed_before = start.history, start.best, start.epoch, start.seconds
    # A new run's folder is created with its first checkpoint: a run that fails before finishing an
    # epoch (bad data found on the first batch, Ctrl-C while compiling) leaves no half-made folder.
    written = start_epoch > 0
    if written and main:
        _snapshot_config(out, config_snapshot)

    step = make_train_step(net, task.loss_fn, optimizer)
    total_steps = max(1, cfg.epochs * cfg.steps_per_epoch)
    budget_s = None if cfg.time_budget_minutes is None else 60.0 * float(cfg.time_budget_minutes)
    steps_done = start_epoch * cfg.steps_per_epoch
    average = WeightAverage(net, cfg.ema, steps_done, start.averaged) if cfg.ema else None
    t0 = time.time()

    def averaged() -> ContextManager[Optional[list]]:
        """The network holds the weight average inside (yielding the raw weights), or stays as it is."""
        return average.applied() if average is not None else nullcontext(None)

    def used() -> float:
        """Seconds of training so far; rank 0's clock when a budget must stop all workers together."""
        seconds = elapsed_before + time.time() - t0
        return float(dist.broadcast([seconds])[0]) if budget_s is not None and dist.active() else seconds

    def progress(seconds: float) -> float:
        p = steps_done / total_steps
        return max(p, seconds / budget_s) if budget_s else p

    def record(epoch: int, row: dict, metrics: dict, validated: bool, raw: Optional[list]) -> None:
        """Keep one finished epoch: its log row, last.ckpt, best.ckpt when it improved, state.json.

        With a weight average, the network holds it here and ``raw`` is the weights training goes on
        from: last.ckpt keeps them beside the average, for resuming."""
        nonlocal best, written
        history.append(row)
        value = row.get(cfg.monitor)
        if validated and value is None and cfg.monitor not in row:
            raise ValueError(f"validation returned no {cfg.monitor!r} (got {', '.join(metrics)})")
        improved = validated and _better(value, best, cfg.monitor_mode)
        if improved:
            best = float(value)
        loop_state = {"epoch": epoch, "best": best, "seconds": elapsed_before + time.time() - t0}
        ckpt_meta = {**meta, "epoch": epoch + 1, "metrics": metrics, "loop": loop_state}
        if not written:
            out.mkdir(parents=True, exist_ok=True)
            _snapshot_config(out, config_snapshot)
            written = True
        if improved:
            runtime.save_checkpoint(best_path, [net], ckpt_meta)
        extra = [RawWeights(average.params, raw)] if average is not None and raw is not None else []
        runtime.save_checkpoint(last_path, [net, optimizer, *extra], ckpt_meta)
        write_json(state_path, {**loop_state, "history": history, "config": asdict(cfg)})
        _write_log(out / "log.csv", history)
        shown = ", ".join(f"{k}={v:.4f}" for k, v in row.items() if k not in ("epoch", "samples", "lr") and isinstance(v, float))
        log.info("epoch %d/%d: %s%s", epoch + 1, cfg.epochs, shown,
                 " (best)" if improved else "" if validated else " (not validated: before train.validate_from)")

    lr_now = float(lr_at(progress(used()), cfg, steps_done))
    for epoch in range(start_epoch, cfg.epochs):
        if budget_s is not None and used() >= budget_s:
            log.info("time budget of %.1f min used up before epoch %d", cfg.time_budget_minutes, epoch + 1)
            if main and history and cfg.monitor not in history[-1]:  # the last epoch is always validated
                with averaged() as raw:
                    metrics = task.validate(net)
                    record(epoch - 1, {**history.pop(), **{k: float(v) for k, v in metrics.items()}}, metrics, True, raw)
            break
        rng = np.random.default_rng(data_seed(cfg.seed, epoch))
        runtime.seed_everything(cfg.seed * 1000 + epoch + 7919 * dist.rank())
        net.set_train(True)
        losses: list[float] = []
        seen = 0
        t_epoch = time.time()
        bar = tqdm(total=cfg.steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not (cfg.progress and main),
                   leave=False, unit="step")
        batches = prefetch(task.batches(epoch, rng), depth=int(cfg.prefetch))
        for i, batch in enumerate(batches):
            seconds = used()
            if i >= cfg.steps_per_epoch or (budget_s is not None and seconds >= budget_s):
                break
            lr_now = float(lr_at(progress(seconds), cfg, steps_done))
            tensors = [ms.Tensor(np.ascontiguousarray(a)) for a in batch]
            loss = float(step(ms.Tensor(np.float32(lr_now)), *tensors).asnumpy())
            steps_done += 1
            if average is not None:
                average.update()
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss became {loss} at epoch {epoch + 1} step {i + 1}; lower optimizer.lr")
            losses.append(loss)
            seen += len(batch[0]) * dist.size()
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}", lr=f"{lr_now:.2e}")
        batches.close()  # the producer thread ends before validation uses the cores
        bar.close()
        train_seconds = time.time() - t_epoch
        net.set_train(False)
        dist.average_buffers(net)
        # progress reaches 1 in the last epoch, also when the budget cuts it short; an epoch left
        # unvalidated when the budget runs out between epochs is validated at the top of the loop
        validated = epoch + 1 == cfg.epochs or progress(used()) >= cfg.validate_from
        if not main:  # rank 0 validates and writes; the others wait for it at the next step's all-reduce
            continue
        with averaged() as raw:
            metrics = task.validate(net) if validated else {}
            row = {
                "epoch": epoch + 1,
                "train_loss": float(np.mean(losses)) if losses else float("nan"),
                "samples": seen,
                "samples_per_s": seen / train_seconds if train_seconds > 0 else float("nan"),
                "lr": lr_now,
                **{k: float(v) for k, v in metrics.items()},
                "seconds": time.time() - t_epoch,
            }
            record(epoch, row, metrics, validated, raw)
    if average is not None:
        average.apply_for_good()
    if main and not best_path.exists() and last_path.exists():
        runtime.save_checkpoint(best_path, [net], {**meta, "epoch": len(history)})
    minutes = (elapsed_before + time.time() - t0) / 60
    dist.barrier()  # every worker returns once rank 0's files are complete
    return TrainResult(history, best_path, last_path, best, minutes)
