"""Run every speed benchmark in this folder and print their figures (``make bench``).

    python -m experiments.benchmarks.run_all [--only seg_speed infer_speed] [--quick] [--json-dir DIR]
        [--args "seg_speed=--big 4000 --threads 2"]

Each benchmark runs in its own Python process, one after the other: MindSpore's thread pool is fixed
by the first kernel of a process and peak memory (``ru_maxrss``) only grows, so sharing a process
would make the second benchmark's figures depend on the first. Their output is streamed as it comes;
a summary of exit codes and wall times follows. Benchmarks print figures and never assert, so a
non-zero exit code here means a benchmark crashed, not that the machine is slow.
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
#: Extra arguments for ``--quick``: small inputs, for checking that the benchmarks still run.
QUICK_ARGS: dict[str, list[str]] = {
    "seg_speed": ["--big", "1200", "--speed-size", "512", "--train-steps", "2"],
    "cls_speed": ["--models", "efficientnet_b0@0.5", "--steps", "2"],
    "infer_speed": ["--images", "1", "--size", "512"],
}


def discover() -> list[str]:
    """Benchmark module names: every ``*.py`` here with a ``main`` entry point, except this runner."""
    names = []
    for path in sorted(HERE.glob("*.py")):
        if path.stem in ("run_all", "__init__") or path.stem.startswith("_"):
            continue
        if "__main__" in path.read_text(encoding="utf-8", errors="replace"):
            names.append(path.stem)
    return names


def parse_extra(items: Sequence[str]) -> dict[str, list[str]]:
    """``["seg_speed=--big 4000"]`` → ``{"seg_speed": ["--big", "4000"]}``."""
    extra: dict[str, list[str]] = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--args {item!r}: expected NAME=ARGUMENTS, e.g. seg_speed=--big 4000")
        name, args = item.split("=", 1)
        extra.setdefault(name.strip(), []).extend(shlex.split(args))
    return extra


def run_one(name: str, args: Sequence[str]) -> tuple[int, float]:
    """Run one benchmark module from the repository root, streaming its output; ``(exit code, seconds)``."""
    cmd = [sys.executable, "-m", f"experiments.benchmarks.{name}", *args]
    print(f"\n=== {name}: {' '.join(shlex.quote(c) for c in cmd[1:])}", flush=True)
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    assert proc.stdout is not None
    for line in proc.stdout:
        # MindSpore's destructor noise at interpreter exit says nothing about the benchmark.
        if "Cell.__del__" in line or "total_instance_count" in line:
            continue
        sys.stdout.write(line)
        sys.stdout.flush()
    code = proc.wait()
    return code, time.time() - t0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Run the speed benchmarks in experiments/benchmarks and print their figures.")
    parser.add_argument("--only", nargs="+", default=None, metavar="NAME", help="run only these (e.g. seg_speed infer_speed)")
    parser.add_argument("--quick", action="store_true", help="small inputs: checks that each benchmark runs (figures not meaningful)")
    parser.add_argument("--json-dir", default=None, help="ask benchmarks that accept --json to write DIR/<name>.json")
    parser.add_argument("--args", action="append", default=[], metavar="NAME=ARGS", help="extra arguments for one benchmark")
    args = parser.parse_args(argv)

    available = discover()
    names = available if args.only is None else list(args.only)
    unknown = [n for n in names if n not in available]
    if unknown:
        print(f"error: no benchmark {', '.join(unknown)} in {HERE} (found: {', '.join(available) or 'none'})", file=sys.stderr)
        return 2
    extra = parse_extra(args.args)
    results = []
    for name in names:
        cmd_args = list(QUICK_ARGS.get(name, [])) if args.quick else []
        source = (HERE / f"{name}.py").read_text(encoding="utf-8", errors="replace")
        if args.json_dir and '"--json"' in source:
            Path(args.json_dir).mkdir(parents=True, exist_ok=True)
            cmd_args += ["--json", str(Path(args.json_dir).resolve() / f"{name}.json")]
        cmd_args += extra.get(name, [])
        results.append((name, *run_one(name, cmd_args)))

    print("\n=== summary")
    for name, code, seconds in results:
        print(f"{name:<16} {'ok' if code == 0 else f'FAILED (exit {code})':<18} {seconds:7.1f} s")
    return 0 if all(code == 0 for _, code, _ in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
