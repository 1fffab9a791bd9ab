"""Where one epoch of segmentation training spends its time, and what background prefetch and jit levels change.

    python -m experiments.benchmarks.train_profile [--images 24] [--steps 12] [--threads 2]
        [--jit-levels default O0 O1] [--json OUT.json]

On a synthetic data set (``cytosynth``, 512² fields, the stage's default config: 128² patches
of batch 8 at scale 0.5, full augmentation, ``unet_small``) it times, for ``--steps`` steps:

* **data**: drawing and augmenting the batches alone (``PatchBatches``: sampling, albumentations,
  normalisation);
* **forward**, **forward+backward** (gradients, no update) and **full step** (with AdamW) on a fixed
  batch, so the optimiser's share is full - forward/backward;
* **epoch, serial**: what the train loop did before -- draw a batch, then run the step, in turn;
* **epoch, prefetched**: batches drawn on a background thread (``cytocore.prefetch``) while the step runs.

``--jit-levels`` repeats the step timings with ``ms.jit(jit_level=...)`` (each in its own compiled
step). Prints figures (patches/s and shares); never asserts. The machine may be shared: compare
figures of one run.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from .output import emit, run_main


def _load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def _step(net: Any, loss_fn: Any, optimizer: Any, jit_level: Optional[str], with_update: bool = True):
    import mindspore as ms
    import mindspore.ops as ops

    def forward(inputs, targets):
        return loss_fn(net(inputs), targets)

    grad_fn = ms.value_and_grad(forward, None, optimizer.parameters)
    jit = ms.jit(jit_level=jit_level) if jit_level else ms.jit

    @jit
    def step(lr, inputs, targets):
        loss, grads = grad_fn(inputs, targets)
        ops.assign(optimizer.learning_rate, lr)
        optimizer(grads)
        return loss

    @jit
    def grads_only(lr, inputs, targets):
        loss, _ = grad_fn(inputs, targets)
        return loss

    return step if with_update else grads_only


def _timed(fn, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--jit-levels", nargs="*", default=[], help="also time the step with these ms.jit levels (O0, O1, O2)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    import mindspore as ms
    import numpy as np

    from cytocore import runtime
    from cytocore.prefetch import prefetch
    from cytosynth.scene import generate
    from cytocore.trainloop import make_optimizer, make_train_step
    from segmentation.train import build_task, load_seg_config, load_split_dataset

    out: dict[str, Any] = {"command": "python -m experiments.benchmarks.train_profile " + " ".join(sys.argv[1:] if argv is None else argv),
                           "load_average_at_start": _load_average()}
    with tempfile.TemporaryDirectory(prefix="cytofuse-profile-") as tmp:
        data = generate(Path(tmp) / "data", n_images=args.images, seed=0, size=512)
        cfg = load_seg_config(overrides=[f"runtime.threads={args.threads}", f"train.steps_per_epoch={args.steps}",
                                         "validation.max_images=1"])
        setup = build_task(cfg, load_split_dataset(cfg, data), progress=False)
    task, loop = setup.task, setup.loop
    b = int(cfg["patches"]["batch_size"])
    n = args.steps

    t0 = time.perf_counter()
    batches = list(task.batches(0, np.random.default_rng([0, 0])))[:n]
    t_data = time.perf_counter() - t0
    net = task.network
    net.set_train(True)
    optimizer = make_optimizer(net.trainable_params(), loop)
    x, y = (ms.Tensor(np.ascontiguousarray(a)) for a in batches[0])
    lr = ms.Tensor(np.float32(loop.optimizer.lr))
    step = make_train_step(net, task.loss_fn, optimizer)
    grads_only = _step(net, task.loss_fn, optimizer, None, with_update=False)

    @ms.jit
    def forward_only(inputs):
        return net(inputs)

    for fn in (lambda: step(lr, x, y).asnumpy(), lambda: grads_only(lr, x, y).asnumpy(), lambda: forward_only(x).asnumpy()):
        fn()  # compile
        fn()
    t_fwd = _timed(lambda: forward_only(x).asnumpy(), n)
    t_grad = _timed(lambda: grads_only(lr, x, y).asnumpy(), n)
    t_step = _timed(lambda: step(lr, x, y).asnumpy(), n)

    def epoch(source) -> float:
        t0 = time.perf_counter()
        for i, batch in enumerate(source):
            if i >= n:
                break
            tensors = [ms.Tensor(np.ascontiguousarray(a)) for a in batch]
            float(step(lr, *tensors).asnumpy())
        return time.perf_counter() - t0

    t_serial = epoch(task.batches(1, np.random.default_rng([0, 1])))
    t_prefetch = epoch(prefetch(task.batches(2, np.random.default_rng([0, 2])), depth=2))
    t_serial2 = epoch(task.batches(3, np.random.default_rng([0, 3])))
    t_prefetch2 = epoch(prefetch(task.batches(4, np.random.default_rng([0, 4])), depth=2))
    patches = n * b
    out["profile"] = {
        "steps": n, "batch": b, "patch": cfg["patches"]["size"],
        "data_s_per_step": round(t_data / n, 3),
        "forward_s_per_step": round(t_fwd / n, 3),
        "forward_backward_s_per_step": round(t_grad / n, 3),
        "full_step_s_per_step": round(t_step / n, 3),
        "optimiser_s_per_step": round((t_step - t_grad) / n, 3),
        "share_of_serial_step": {
            "data": round(t_data / (t_data + t_step), 2),
            "forward": round(t_fwd / (t_data + t_step), 2),
            "backward": round((t_grad - t_fwd) / (t_data + t_step), 2),
            "optimiser": round((t_step - t_grad) / (t_data + t_step), 2),
        },
    }
    out["epoch_patches_per_s"] = {
        "serial": [round(patches / t_serial, 2), round(patches / t_serial2, 2)],
        "prefetched": [round(patches / t_prefetch, 2), round(patches / t_prefetch2, 2)],
        "compute_only_step": round(patches / t_step, 2),
        "order": "serial, prefetched, serial, prefetched (alternated against load drift)",
    }
    levels = {}
    for level in args.jit_levels:
        try:
            fn = _step(net, task.loss_fn, optimizer, level)
            fn(lr, x, y).asnumpy()
            fn(lr, x, y).asnumpy()
            levels[level] = round(patches / _timed(lambda: fn(lr, x, y).asnumpy(), n), 2)
        except (RuntimeError, TypeError, ValueError) as exc:
            levels[level] = f"failed: {str(exc).splitlines()[0][:200]}"
    if levels:
        levels["default"] = round(patches / _timed(lambda: step(lr, x, y).asnumpy(), n), 2)
        out["step_patches_per_s_by_jit_level"] = levels
    out["load_average_at_end"] = _load_average()
    out["versions"] = runtime.runtime_info()
    emit(out, args.json)
    return 0


if __name__ == "__main__":
    run_main(main)
