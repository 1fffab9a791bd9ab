"""Several workers: msrun data-parallel training keeps every worker on the same weights, and those
weights are the single process's with the same global batch (this is what un-averaged gradients fail)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cytocore import distributed
from cytocore.errors import CytoFuseError

REPO = Path(__file__).resolve().parents[1]


def test_plain_process_is_not_distributed(monkeypatch):
    monkeypatch.delenv("MS_ROLE", raising=False)
    from cytocore.trainloop import data_seed

    assert not distributed.launched() and not distributed.active()
    assert distributed.env_size() == 1 and distributed.rank() == 0 and distributed.is_main()
    assert distributed.per_worker_batch(6, "patches.batch_size") == 6
    assert data_seed(3, 2) == [3, 2]  # a single run draws exactly what it drew before workers existed


def test_global_batch_must_split_over_workers(monkeypatch):
    monkeypatch.setenv("MS_ROLE", "MS_WORKER")
    monkeypatch.setenv("RANK_SIZE", "4")
    assert distributed.per_worker_batch(8, "patches.batch_size") == 2
    with pytest.raises(CytoFuseError, match="patches.batch_size=6 .* 4 workers"):
        distributed.per_worker_batch(6, "patches.batch_size")


def test_workers_flag_is_not_passed_on(monkeypatch):
    argv = ["seg", "train", "--workers", "2", "--out", "r", "--workers=3", "--set", "train.epochs=1"]
    assert distributed.strip_workers_flag(argv) == ["seg", "train", "--out", "r", "--set", "train.epochs=1"]
    cmd = distributed.msrun_command(["seg", "train"], 2, Path("logs"), port=12345)
    assert "--worker_num=2" in cmd and "--local_worker_num=2" in cmd and "--master_port=12345" in cmd
    assert cmd[-3].endswith("cytofuse") and cmd[-2:] == ["seg", "train"]


def test_free_port_can_be_bound():
    import socket

    port = distributed.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def _max_diff(a: dict, prefix: str, arrays: list) -> float:
    keys = sorted((k for k in a if k.startswith(prefix + "_")), key=lambda k: int(k.rsplit("_", 1)[1]))
    assert len(keys) == len(arrays)
    return max(float(np.abs(a[k] - r).max()) for k, r in zip(keys, arrays))


@pytest.mark.slow
def test_two_msrun_workers_average_gradients_like_one_process(tmp_path):
    """~40 s: msrun starts 2 CPU workers that train a tiny U-Net 2 epochs x 3 steps (tests/dist_worker.py)."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")  # msrun runs `python`
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["CYTOFUSE_LOCAL_WORKERS"] = "2"
    env.pop("MS_ROLE", None)
    cmd = [sys.executable, "-m", "mindspore.parallel.cluster.run", "--worker_num=2", "--local_worker_num=2",
           f"--master_port={distributed.free_port()}", f"--log_dir={tmp_path / 'logs'}", "--join=True",
           "--cluster_time_out=120", str(REPO / "tests" / "dist_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    logs = "\n".join(p.read_text()[-3000:] for p in sorted((tmp_path / "logs").glob("*.log")))
    assert proc.returncode == 0, logs
    w0, w1 = (dict(np.load(tmp_path / f"weights_rank{r}.npz")) for r in (0, 1))
    assert int(w0["size"]) == 2 and int(w1["size"]) == 2

    # 1. The workers agree exactly: weights, and BatchNorm running statistics (averaged per epoch).
    for name in ("group", "batch", "resumed"):
        keys = [k for k in w0 if k.startswith(name + "_")]
        assert keys and all(np.array_equal(w0[k], w1[k]) for k in keys), name

    # BatchNorm statistics are averaged in place: the compiled step keeps updating them after that.
    assert "bnstats_1" in w0 and "bnstats_0" not in w1  # only rank 0 validates
    assert not np.allclose(w0["bnstats_0"], w0["bnstats_1"])

    # 2. They equal one process with the same global batch: float tolerance (reduction order only).
    from tests.dist_worker import train_tiny

    single = train_tiny(tmp_path / "single", "group", epochs=2)
    start = train_tiny(tmp_path / "untrained", "group", epochs=0)
    assert _max_diff(w0, "group", single) < 1e-5
    assert _max_diff(w0, "group", start) > 1e-3  # they did learn: the comparison is not vacuous

    # 3. A job killed in epoch 2 and resumed (fresh workers, another init seed) ends where the uninterrupted one did.
    assert _max_diff(w0, "resumed", single) < 1e-5

    # 4. Only rank 0 wrote the run folder; both workers trained.
    assert (tmp_path / "group" / "last.ckpt").is_file() and (tmp_path / "group" / "log.csv").is_file()
    rows = (tmp_path / "group" / "log.csv").read_text().strip().splitlines()
    assert len(rows) == 3 and rows[1].split(",")[2] == "12"  # 3 steps x global batch 4 per epoch
