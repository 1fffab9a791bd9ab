"""Several workers, one job: MindSpore's ``msrun`` launcher, data-parallel training, sharded inference.

We build no scheduler of our own. ``msrun --worker_num=N ... cytofuse seg train ...`` starts N
worker processes (plus one scheduler process that runs the same command) and tells each its role in
environment variables; this module reads them, joins the workers into one communication group, and
offers the few collective operations the train loop and the folder runner need.

Nothing here touches MindSpore's communication layer unless the process was started by a launcher
(``MS_ROLE`` set): a plain ``cytofuse`` run stays a single process with no distributed set-up.

Why the train loop reduces gradients itself: MindSpore's data-parallel mode averages gradients inside
``nn.TrainOneStepCell``, but our loop has its own compiled step (the learning rate is a step input),
so it inserts an ``nn.DistributedGradReducer`` (all-reduce, then divide by the worker count) between
the gradient and the optimiser. On CPU MindSpore's all-reduce only sums, so a mean is a sum divided
by the worker count, and "rank 0's value" is a broadcast.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from .errors import CytoFuseError

log = logging.getLogger("cytofuse")

ROLE_ENV = "MS_ROLE"  # MS_WORKER or MS_SCHED, set by msrun for every process it starts
LOCAL_WORKERS_ENV = "CYTOFUSE_LOCAL_WORKERS"  # workers sharing this machine's cores (set by --workers)

_state: dict[str, Any] = {"ready": False, "rank": 0, "size": 1}


# ------------------------------------------------------------------------------------ who am I


def launched() -> bool:
    """Was this process started by msrun (as a worker or as its scheduler)?"""
    return os.environ.get(ROLE_ENV) in ("MS_WORKER", "MS_SCHED")


def is_scheduler() -> bool:
    """msrun's scheduler process runs the same command; it must only coordinate, never load data."""
    return os.environ.get(ROLE_ENV) == "MS_SCHED"


def env_size() -> int:
    """Number of workers in the job as the launcher announced it (1 for a plain run)."""
    if not launched():
        return 1
    return max(1, int(os.environ.get("RANK_SIZE") or os.environ.get("MS_WORKER_NUM") or 1))


def local_workers() -> int:
    """Workers sharing this machine's cores (so each takes its share of threads); set by ``--workers``."""
    return max(1, int(os.environ.get(LOCAL_WORKERS_ENV) or 1))


def init() -> None:
    """Join the msrun job (once). In the scheduler process this call never returns.

    Needs ``mindspore.set_device`` first; :func:`cytocore.runtime.setup` calls it in that order.
    """
    if _state["ready"] or not launched():
        return
    from mindspore.communication import get_group_size, get_rank
    from mindspore.communication import init as ms_init

    ms_init()  # the scheduler serves the cluster here and exits when the workers are done
    _state.update(ready=True, rank=int(get_rank()), size=int(get_group_size()))
    if _state["rank"] != 0:  # msrun shows every worker's output: only rank 0 reports progress
        logging.getLogger("cytofuse").setLevel(logging.WARNING)
    log.info("worker %d of %d joined the job", _state["rank"], _state["size"])


def joined() -> bool:
    """Did this process join an msrun job (and so must leave it by a normal interpreter exit)?"""
    return bool(_state["ready"])


def rank() -> int:
    return int(_state["rank"])


def size() -> int:
    return int(_state["size"])


def active() -> bool:
    """Initialised with more than one worker: collectives are needed."""
    return bool(_state["ready"]) and _state["size"] > 1


def is_main() -> bool:
    """Rank 0 writes checkpoints, logs and validation; every process is main in a plain run."""
    return rank() == 0


def per_worker_batch(global_batch: int, key: str) -> int:
    """The share of a global batch one worker draws; the global batch (the config's) must split evenly.

    Keeping the configured batch global means a job of N workers follows the same optimisation
    (batch size, learning rate, steps) as one process: it only spreads the work.
    """
    n = env_size() if not _state["ready"] else size()
    if global_batch % n:
        raise CytoFuseError(f"{key}={global_batch} is the global batch and must split evenly over {n} workers")
    return global_batch // n


# ----------------------------------------------------------------------------------- collectives


def grad_reducer(parameters: Sequence[Any]) -> Optional[Any]:
    """``nn.DistributedGradReducer`` averaging gradients over the workers, or None in a plain run."""
    if not active():
        return None
    import mindspore.nn as nn

    return nn.DistributedGradReducer(parameters, mean=True, degree=size())


def broadcast(values: Sequence[float]) -> np.ndarray:
    """Rank 0's ``values`` on every worker (decisions that must agree: stop, resume epoch, clock)."""
    arr = np.asarray(values, np.float64)
    if not active():
        return arr
    import mindspore as ms
    import mindspore.ops as ops

    (out,) = ops.Broadcast(0)((ms.Tensor(arr),))
    return out.asnumpy()


def broadcast_parameters(cells: Iterable[Any]) -> None:
    """Copy rank 0's parameters (weights, optimiser moments) into every worker.

    Makes every worker start from the same state whatever it read itself: a resumed checkpoint that
    only rank 0 can see (no shared disk), or a random initialisation.
    """
    if not active():
        return
    import mindspore.ops as ops

    params = _unique_parameters(cells)
    bcast = ops.Broadcast(0)
    for p in params:
        (value,) = bcast((p.value(),))
        ops.assign(p, value)


def average_buffers(cell: Any) -> None:
    """Average a network's non-trainable float state (BatchNorm running statistics) over workers.

    Each worker updates its running statistics from its own share of the batch; an exponential
    moving average is linear, so averaging the workers' averages equals averaging every step's batch
    means (variances lose only the between-worker spread). Done before validation and checkpoints.
    """
    if not active():
        return
    import mindspore as ms
    import mindspore.ops as ops

    reduce = ops.AllReduce()
    for p in cell.untrainable_params():
        if p.dtype in (ms.float16, ms.float32, ms.float64):
            # In place: set_data would give the parameter new memory that the compiled step never updates.
            ops.assign(p, reduce(p.value()) / size())


def barrier() -> None:
    """Wait until every worker got here."""
    broadcast([0.0])


def _unique_parameters(cells: Iterable[Any]) -> list:
    seen: set[str] = set()
    out = []
    for cell in cells:
        for p in cell.get_parameters():
            if p.name not in seen:
                seen.add(p.name)
                out.append(p)
    return out


# -------------------------------------------------------------------------------- launching


def free_port() -> int:
    """A TCP port on this machine that nothing listens on right now (for msrun's scheduler)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _script() -> str:
    """The installed ``cytofuse`` console script, which msrun runs with ``python``."""
    bin_dir = str(Path(sys.executable).parent)
    found = shutil.which("cytofuse", path=bin_dir) or shutil.which("cytofuse")
    if not found:
        raise CytoFuseError("--workers needs the `cytofuse` command installed (pip install -e .)")
    return found


def msrun_command(argv: Sequence[str], workers: int, log_dir: Path, port: Optional[int] = None) -> list[str]:
    """The msrun command that runs ``cytofuse <argv>`` as ``workers`` local workers."""
    return [
        sys.executable, "-m", "mindspore.parallel.cluster.run",
        f"--worker_num={workers}", f"--local_worker_num={workers}",
        "--master_addr=127.0.0.1", f"--master_port={port or free_port()}",
        f"--log_dir={log_dir}", "--join=True", "--tail_worker_log=0",
        _script(), *argv,
    ]


def strip_workers_flag(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--workers N`` / ``--workers=N`` (the workers must not relaunch)."""
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--workers":
            skip = True
            continue
        if a.startswith("--workers="):
            continue
        out.append(a)
    return out


def relaunch(workers: int, log_dir: Path, argv: Optional[Sequence[str]] = None) -> int:
    """Run this same ``cytofuse`` command as ``workers`` data-parallel workers on this machine via msrun.

    msrun runs ``python`` from PATH, so this interpreter's folder goes first; each worker gets an
    equal share of the cores. Worker logs land in ``log_dir``; rank 0's is shown as it runs.
    """
    if launched():
        raise CytoFuseError("--workers is for a plain command; under msrun the launcher sets the workers")
    args = strip_workers_flag(sys.argv[1:] if argv is None else argv)
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    env = _worker_env(workers)
    cmd = msrun_command(args, workers, log_dir)
    log.info("starting %d workers with msrun (logs in %s)", workers, log_dir)
    code = _wait([subprocess.Popen(cmd, env=env)])[0]
    if code:
        print(f"error: a worker failed (exit {code}); see {log_dir}/worker_*.log and scheduler.log", file=sys.stderr)
    return code


def _worker_env(workers: int) -> dict:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env[LOCAL_WORKERS_ENV] = str(workers)
    return env


def _wait(procs: Sequence[subprocess.Popen]) -> list[int]:
    """Exit codes of the children; on Ctrl-C each is asked to stop (msrun then stops its workers) first."""
    try:
        return [p.wait() for p in procs]
    except KeyboardInterrupt:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in procs:
            p.wait()
        raise


def run_local_shards(workers: int, log_dir: Path, argv: Sequence[str]) -> int:
    """Run this same command as ``workers`` processes, ``--shard i/workers`` each, and wait for all.

    Sharded inference needs no communication between workers, so no msrun: worker 0 prints to this
    terminal, the others to ``log_dir/shard_<i>.log``. Exit status: 1 if a worker crashed, else 3
    if images failed in any, else 0.
    """
    if launched():
        raise CytoFuseError("--workers is for a plain command; under msrun each worker takes its shard from its rank")
    args = strip_workers_flag(argv)
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    env = _worker_env(workers)
    procs, logs = [], []
    for i in range(workers):
        cmd = [sys.executable, _script(), *args, "--shard", f"{i}/{workers}"]
        if i == 0:
            procs.append(subprocess.Popen(cmd, env=env))
            continue
        logs.append(open(log_dir / f"shard_{i}.log", "w", encoding="utf-8"))
        procs.append(subprocess.Popen([*cmd, "--no-progress"], env=env, stdout=logs[-1], stderr=subprocess.STDOUT))
    try:
        codes = _wait(procs)
    finally:
        for fh in logs:
            fh.close()
    for i, code in enumerate(codes):
        if code not in (0, 3):
            where = "above" if i == 0 else str(log_dir / f"shard_{i}.log")
            print(f"error: worker {i}/{workers} failed (exit {code}); see {where}", file=sys.stderr)
    return 1 if any(c not in (0, 3) for c in codes) else (3 if 3 in codes else 0)
