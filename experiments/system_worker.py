"""One system of a side-by-side comparison (:mod:`experiments.side_by_side`), run in its own process.

``python -m experiments.system_worker --out OUT --system two-stage --threads 1`` reads the
``OUT/compare_config.yaml`` and ``OUT/splits.csv`` that the parent wrote, trains and infers the system
as the one-process comparison does, writes its training records to ``OUT/logs/<system>.json`` and
prints its log to stdout, which the parent echoes and keeps. Internal: users run ``cytofuse compare``.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from cytocore.atomic import write_json
from cytocore.errors import CytoFuseError

from .runkit import SINGLE_STAGE, TWO_STAGE, Phases, prepare_data


def work(out: Path, system: str, threads: int) -> dict:
    """One system's whole run in this process, from the files the parent wrote."""
    import yaml

    from cytocore import runtime

    from . import compare

    cfg = yaml.safe_load((out / "compare_config.yaml").read_text(encoding="utf-8"))
    runtime.setup(seed=int(cfg["seed"]), threads=threads)  # first: the stages' own setup() then keeps these threads
    cfg["progress"] = False  # bars from two processes would interleave; the phase and epoch lines remain
    ds, data_path = prepare_data(cfg, out)
    phases = Phases(compare.system_phase_names([system], bool(cfg["fusion_fit"])))
    if system == TWO_STAGE:
        return compare.run_two_stage(cfg, ds, data_path, out, phases, progress=False)
    seg, cls = compare.planned_stage_budgets(cfg, data_path)
    return compare.run_single_stage(cfg, ds, data_path, out, phases, False, seg, cls)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="one system of `cytofuse compare`, run side by side (internal)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--system", required=True, choices=[TWO_STAGE, SINGLE_STAGE])
    parser.add_argument("--threads", type=int, required=True, help="MindSpore threads of this worker")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s", stream=sys.stdout)
    out = Path(args.out)
    code = 0
    try:
        write_json(out / "logs" / f"{args.system}.json", work(out, args.system, args.threads))
    except CytoFuseError as exc:
        print(f"error: {exc}", flush=True)
        code = 2
    except Exception:  # noqa: BLE001 - a bug: its traceback goes to the log the parent names
        import traceback

        traceback.print_exc(file=sys.stdout)
        code = 1
    sys.stdout.flush()
    os._exit(code)  # skip MindSpore's teardown noise (see experiments.cli.main)


if __name__ == "__main__":
    main()
