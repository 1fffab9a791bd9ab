"""One worker of the 2-worker data-parallel test (tests/test_distributed.py), started by msrun.

Also importable: the test process runs :func:`train_tiny` itself as the single-process reference.
Every worker trains a tiny U-Net for a few steps on fixed data; worker ``r`` of ``n`` gets rows
``r*B:(r+1)*B`` of each global batch of ``n*B``, so the union over workers is exactly the global batch
the single process sees. The loss is per-pixel BCE (dice weight 0), whose mean over a batch is the
mean of the shards' means, so averaged gradients equal the single process's up to float rounding.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # msrun runs this file as a script
    sys.path.insert(0, str(REPO))

GLOBAL_BATCH = 4
STEPS = 3
PATCH = 16


def global_batches(steps: int = STEPS) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(123)
    out = []
    for _ in range(steps):
        x = rng.normal(size=(GLOBAL_BATCH, 3, PATCH, PATCH)).astype(np.float32)
        y = (rng.random((GLOBAL_BATCH, 1, PATCH, PATCH)) < 0.3).astype(np.float32)
        out.append((x, y))
    return out


def train_tiny(out: Path, norm: str, epochs: int = 1, kill_at_epoch: int = -1, resume: bool = False,
               init_seed: int = 0, stats: Optional[list] = None) -> list[np.ndarray]:
    """Train a tiny U-Net with the shared loop; returns its parameters (weights and BatchNorm statistics).

    ``stats`` collects the running statistics rank 0 validates with after each epoch.
    """
    from cytocore import distributed, runtime
    from cytocore.trainloop import LoopConfig, OptimConfig, TrainTask, train
    from segmentation.losses import make_loss
    from segmentation.unet import create_unet

    runtime.setup(seed=init_seed)
    net = create_unet(depth=2, base_width=8, norm=norm, groups=4, out_channels=1)
    loss = make_loss("binary", 1, {"dice_weight": 0.0})
    data = global_batches()
    share = distributed.per_worker_batch(GLOBAL_BATCH, "batch")
    lo = distributed.rank() * share

    def batches(epoch, rng):
        if epoch == kill_at_epoch:
            raise KeyboardInterrupt  # every worker "dies" at the same point
        for x, y in data:
            yield x[lo:lo + share], y[lo:lo + share]

    def validate(network):
        if stats is not None:
            stats.append(np.concatenate([p.asnumpy().ravel() for p in network.untrainable_params()]))
        return {"val_loss": 0.0}

    cfg = LoopConfig(epochs=epochs, steps_per_epoch=STEPS, seed=5, monitor="val_loss", monitor_mode="min",
                     progress=False, optimizer=OptimConfig(lr=1e-2, schedule="cosine"))
    train(TrainTask(net, loss, batches, validate), cfg, out, resume=resume)
    return [p.asnumpy().copy() for p in net.get_parameters()]


def main(out_dir: str) -> None:
    from cytocore import distributed

    out = Path(out_dir)
    bn_stats: list = []
    results = {
        "group": train_tiny(out / "group", "group", epochs=2),
        "batch": train_tiny(out / "batch", "batch", epochs=2, stats=bn_stats),
    }
    try:
        train_tiny(out / "resumed", "group", epochs=2, kill_at_epoch=1)
    except KeyboardInterrupt:
        pass
    results["resumed"] = train_tiny(out / "resumed", "group", epochs=2, resume=True, init_seed=77)
    rank = distributed.rank()
    np.savez(out / f"weights_rank{rank}.npz",
             **{f"{k}_{i}": a for k, arrays in results.items() for i, a in enumerate(arrays)},
             size=np.array(distributed.size()), **{f"bnstats_{i}": a for i, a in enumerate(bn_stats)})


if __name__ == "__main__":
    main(sys.argv[1])
