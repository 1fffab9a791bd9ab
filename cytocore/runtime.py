"""The one place that sets up MindSpore: device, threads, mode, seeds, checkpoints, quiet output.

Every stage and the baseline call :func:`setup` before building a network, so a run is reproducible
and uses the machine sensibly (MindSpore's CPU default is a 30-thread kernel pool, which on a 2-core
workstation is slower than 2 threads). Checkpoints are MindSpore's protobuf ``.ckpt`` files (no
pickle), written atomically, with a JSON metadata record inside them so a checkpoint says which
architecture, classes and config it belongs to.
"""
from __future__ import annotations

import json
import logging
import os
import random
import sys
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import numpy as np

from .atomic import atomic_path
from .errors import CheckpointError

log = logging.getLogger("cytofuse")

PathLike = Union[str, Path]
META_KEY = "cytofuse_meta"

_state: dict[str, Any] = {"ready": False}


def mindspore_env() -> None:
    """Environment MindSpore reads before its first kernel: glog keeps only errors unless the user
    asked for verbose output, no compile caches in the working directory, and the oneDNN cap of
    :func:`onednn_isa_cap`."""
    if os.environ.get("CYTOFUSE_MS_LOG") != "1":
        os.environ.setdefault("GLOG_v", "3")
        os.environ.setdefault("GLOG_logtostderr", "1")
    # Kernel-compile caches default to the working directory; keep users' folders clean.
    os.environ.setdefault("MS_COMPILER_CACHE_ENABLE", "0")
    isa = onednn_isa_cap()
    if isa and "DNNL_MAX_CPU_ISA" not in os.environ:
        os.environ["DNNL_MAX_CPU_ISA"] = isa


def onednn_isa_cap(cpuinfo: PathLike = "/proc/cpuinfo") -> Optional[str]:
    """The instruction set to cap MindSpore's oneDNN kernels at on this CPU, or None for no cap.

    On x86 CPUs with AVX-512 the oneDNN AVX-512 convolution kernels bundled with MindSpore 2.10 run
    50-90x slower than its AVX2 ones. Measured with the same wheel and process settings, a 3x3
    convolution on 8x32x128x128: AMD EPYC (Zen) 2.2 s against 40 ms with ``DNNL_MAX_CPU_ISA=AVX2``
    (U-Net training 0.46 -> 8.7 patches/s); Intel Xeon with AVX-512 FP16 (Sapphire Rapids class)
    2.76 s against 32 ms (AVX512_CORE: 1.68 s). The vendor does not matter, so the cap follows the
    flag. oneDNN reads the variable when its first kernel is created, so setting it here, before any
    network runs, is enough. A user who sets ``DNNL_MAX_CPU_ISA`` themselves (e.g. ``ALL``) keeps
    their choice.
    """
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return None
    head = text.split("\n\n", 1)[0]
    flags = next((line.split(":", 1)[1].split() for line in head.splitlines() if line.startswith("flags")), [])
    return "AVX2" if "avx512f" in flags else None


def _install_exit_noise_filter() -> None:
    """Hide ``Cell.__del__`` AttributeErrors raised while the interpreter tears modules down.

    They come from MindSpore's cell destructor running after its module globals were cleared; they
    are harmless and only alarm users. Anything else unraisable is still reported.
    """
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        obj = getattr(unraisable, "object", None)
        name = getattr(obj, "__qualname__", "") or ""
        if isinstance(unraisable.exc_value, AttributeError) and ("__del__" in name or "Cell" in repr(obj)[:200]):
            return
        previous(unraisable)

    sys.unraisablehook = hook


def default_threads() -> int:
    """The cores this process may use, shared equally among the workers of a job on this machine."""
    from . import distributed

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // distributed.local_workers())


def setup(seed: Optional[int] = 0, threads: Optional[int] = None, mode: str = "graph", device: str = "CPU") -> Any:
    """Configure MindSpore once per process and return the ``mindspore`` module.

    ``mode`` is ``"graph"`` (compiled, fastest for training) or ``"pynative"`` (eager, handy for
    debugging). ``threads`` defaults to the cores this process may use. Calling again only re-seeds
    (MindSpore's device and thread pool cannot change after the first kernel runs). A process started
    by msrun joins its job here (:mod:`cytocore.distributed`); msrun's scheduler process stays in that
    call until the job ends.
    """
    mindspore_env()
    import mindspore as ms

    if not _state["ready"]:
        _install_exit_noise_filter()
        ms.set_device(device)
        n = threads or default_threads()
        try:
            ms.device_context.cpu.op_tuning.threads_num(n)
        except (AttributeError, RuntimeError) as exc:  # older/newer API: fall back to the context option
            log.debug("threads_num not available (%s); using set_context", exc)
            ms.set_context(runtime_num_threads=n)
        _state.update(ready=True, threads=n, device=device)
        from . import distributed

        distributed.init()
    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
    _state["mode"] = mode
    if seed is not None:
        seed_everything(seed)
    return ms


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and MindSpore so two runs with one seed give the same weights and batches."""
    import mindspore as ms

    random.seed(seed)
    np.random.seed(seed % (2**32))
    ms.set_seed(seed)


def runtime_info() -> dict[str, Any]:
    """Versions and settings to record with every run (``run.json``, config snapshots)."""
    import mindspore as ms

    info = {
        "mindspore": ms.__version__,
        "numpy": np.__version__,
        "python": sys.version.split()[0],
        "device": _state.get("device"),
        "threads": _state.get("threads"),
        "mode": _state.get("mode"),
        "workers": _workers(),
        "onednn_max_isa": os.environ.get("DNNL_MAX_CPU_ISA", "default"),
    }
    try:
        import mindcv

        info["mindcv"] = getattr(mindcv, "__version__", "unknown")
    except ImportError:
        pass
    return info


def _workers() -> int:
    from . import distributed

    return distributed.size()


# --------------------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: PathLike, cells: Iterable[Any], meta: Optional[dict] = None) -> Path:
    """Save the parameters of one or more cells (network, optimiser) atomically, with JSON metadata.

    Parameters shared between cells (the optimiser holds the network's weights too) are written once.
    """
    import mindspore as ms

    params: list[dict[str, Any]] = []
    seen: set[str] = set()
    for cell in cells:
        for name, param in cell.parameters_and_names():
            key = param.name or name
            if key in seen:
                continue
            seen.add(key)
            params.append({"name": key, "data": param})
    path = Path(path)
    append = {META_KEY: json.dumps(meta or {}, default=str)}
    with atomic_path(path) as tmp:
        ms.save_checkpoint(params, str(tmp), append_dict=append)
    return path


def load_checkpoint(path: PathLike) -> tuple[dict[str, Any], dict]:
    """Read a checkpoint: ``(parameter dict, metadata dict)``. Errors name the file."""
    import mindspore as ms

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        params = ms.load_checkpoint(str(path))
    except (RuntimeError, ValueError, OSError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise CheckpointError(f"{path}: not a readable MindSpore checkpoint ({first})") from None
    raw = params.pop(META_KEY, None)
    meta: dict = {}
    if raw is not None:
        try:
            value = raw.asnumpy() if hasattr(raw, "asnumpy") else raw
            meta = json.loads(str(value.item() if hasattr(value, "item") else value))
        except (ValueError, TypeError):
            meta = {}
    return params, meta


def load_into(cell: Any, params: dict[str, Any], path: PathLike = "<checkpoint>", strict: bool = True) -> list[str]:
    """Load parameters into a cell; with ``strict``, any missing or mis-shaped weight is a clear error.

    Returns the names of the cell's parameters that were not in ``params``.
    """
    import mindspore as ms

    own = {p.name: p for p in cell.get_parameters()}
    missing = [n for n in own if n not in params]
    mismatched = [
        f"{n} {tuple(params[n].shape)} != {tuple(p.shape)}" for n, p in own.items() if n in params and tuple(params[n].shape) != tuple(p.shape)
    ]
    if strict and (missing or mismatched):
        detail = "; ".join((mismatched[:3] or []) + ([f"missing {', '.join(missing[:3])}"] if missing else []))
        raise CheckpointError(f"{path}: checkpoint does not fit this model ({detail})")
    subset = {n: v for n, v in params.items() if n in own and tuple(v.shape) == tuple(own[n].shape)}
    ms.load_param_into_net(cell, subset, strict_load=False)
    return missing
