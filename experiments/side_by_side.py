"""Train and run the two compared systems at once, each in its own process with half the cores' threads.

Why: one MindSpore process does not use two CPU cores fully, and the post-processing between the
networks runs on one. On the 2-core machine this project is built on, one process with 2 threads
trains 7.5 U-Net patches/s, while two processes with one thread each train 5.7 + 5.9
(``python -m experiments.benchmarks.seg_speed --skip memory --skip inference --threads 1``, one and two
at a time). So the comparison finishes sooner side by side, and stays fair: each system gets the same
threads for the same minutes. The single-stage baseline cannot wait for the two stages' measured
minutes here, so it gets their budgets in full (:func:`experiments.compare.baseline_budget`), at least
the compute the two stages can use.

The workers share all cores rather than being pinned to one each: MindSpore 2.10 trains EfficientNet
~5x slower in a process confined to one core (8.7 crops/s with ``taskset -c 0`` against 42.5 with
the same single kernel thread and two cores allowed; ``experiments.benchmarks.cls_speed``), while
unpinned two one-thread processes train 17.8 + 16.8 crops/s, and the U-Net is as fast either way.

``parallel: auto`` (the default) runs side by side when both systems are compared, this process may
use two or more cores, and it is not an msrun worker; ``true`` insists; ``false`` runs them one after
the other in this process. Each worker is ``python -m experiments.system_worker`` on the run folder:
it reads ``OUT/compare_config.yaml`` and ``OUT/splits.csv`` that the parent wrote, trains and infers
its system exactly as the one-process run does (:func:`experiments.compare.run_two_stage` /
:func:`~experiments.compare.run_single_stage`, so resuming and reuse are the same), writes its
training records to ``OUT/logs/<system>.json`` and its log to ``OUT/logs/<system>.log``; the parent
echoes each log line with the system's name and scores both when both have finished. A failed
worker stops nothing that finished: run the same command again and both continue where they were.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from cytocore.errors import CytoFuseError

from .runkit import SINGLE_STAGE, TWO_STAGE

log = logging.getLogger("cytofuse")

__all__ = ["threads_each", "run_systems"]


def threads_each(cfg: Mapping[str, Any]) -> Optional[int]:
    """The MindSpore threads of each system's worker, or None to run them one after the other."""
    from cytocore import runtime

    mode = cfg.get("parallel", "auto")
    if mode not in ("auto", True, False):
        raise CytoFuseError(f"parallel must be auto, true or false, not {mode!r}")
    if mode is False:
        return None
    cores = runtime.default_threads()
    reason = _why_not(cfg, cores)
    if reason:
        if mode is True:
            raise CytoFuseError(f"parallel: true, but {reason} (set parallel: false or auto)")
        log.info("    the systems run one after the other: %s", reason)
        return None
    return cores // 2


def _why_not(cfg: Mapping[str, Any], n_cores: int) -> Optional[str]:
    from cytocore import distributed

    b = cfg["budget"]
    if sorted(cfg["systems"]) != sorted([TWO_STAGE, SINGLE_STAGE]):
        return "only one system is compared"
    if n_cores < 2:
        return f"this process may use {n_cores} core"
    if distributed.launched():
        return "this is an msrun job (its workers already share the cores)"
    if b["baseline_minutes"] == "auto" and (b["seg_minutes"] is None or b["cls_minutes"] is None):
        return "the baseline's auto budget needs seg_minutes and cls_minutes"
    return None


def run_systems(systems: Sequence[str], threads: int, out: Path) -> dict:
    """Start one worker per system, echo their logs, wait for both; return their training records
    (``seg``, ``cls``, ``baseline`` as in ``done.json``). Ctrl-C or an error here stops both workers."""
    from cytocore import distributed, runtime

    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    runtime.mindspore_env()  # quiet glog and the oneDNN cap, set before the workers import MindSpore
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env[distributed.LOCAL_WORKERS_ENV] = str(len(systems))  # each worker's default threads: its share of the cores
    procs, echoes = {}, []
    try:
        for system in systems:
            (logs / f"{system}.json").unlink(missing_ok=True)
            cmd = [sys.executable, "-m", "experiments.system_worker", "--out", str(out), "--system", system,
                   "--threads", str(threads)]
            procs[system] = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                             text=True, encoding="utf-8", errors="replace")
            echo = threading.Thread(target=_echo, args=(system, procs[system].stdout, logs / f"{system}.log"), daemon=True)
            echo.start()
            echoes.append(echo)
        codes = {system: p.wait() for system, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
        for echo in echoes:
            echo.join(timeout=5)
    failed = [s for s, code in codes.items() if code != 0]
    if failed:
        raise CytoFuseError("; ".join(f"{s} failed (exit {codes[s]}): {_last_error(logs / f'{s}.log')}, see {logs / f'{s}.log'}"
                                      for s in failed) + "; run the same command again to continue from what finished")
    runs: dict = {}
    for system in systems:
        runs.update(json.loads((logs / f"{system}.json").read_text(encoding="utf-8")))
    return runs


def _echo(system: str, stream: Any, path: Path) -> None:
    """Copy a worker's output to its log file and to this process's log, line by line, with its name."""
    with open(path, "w", encoding="utf-8") as fh:
        for line in stream:
            fh.write(line)
            fh.flush()
            text = line.rstrip()
            if not text:
                continue
            level, _, message = text.partition(": ")
            if level in ("INFO", "WARNING", "ERROR", "DEBUG") and message:
                log.log(getattr(logging, level), "[%s] %s", system, message)
            else:
                log.info("[%s] %s", system, text)


def _last_error(path: Path) -> str:
    lines = [x.strip() for x in path.read_text(encoding="utf-8", errors="replace").splitlines() if x.strip()]
    for line in reversed(lines):
        if line.startswith(("error:", "ERROR:")) or "Error" in line.split(":")[0]:
            return line
    return lines[-1] if lines else "no output"
