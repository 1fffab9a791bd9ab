"""Inference and training backends side by side in one run: MindSpore, ONNX Runtime, PyTorch (reference).

    python -m experiments.benchmarks.backends [--threads 2] [--rounds 5] [--skip unet cls train fused]
        [--fused-size 2048] [--json OUT.json]

1. **U-Net inference** (``unet_small``, eval mode, a ``4x3x256x256`` batch): megapixels per second of
   MindSpore graph mode, the same weights exported by ``cytofuse export``'s code and run by ONNX
   Runtime, and -- only if ``torch`` is importable, never a dependency -- the same architecture in
   PyTorch with the same weights. Outputs are compared first (max |diff|), then the backends are timed
   in interleaved rounds (A, B, C, A, B, C, ...) so a load change on the shared machine hits all of
   them; the median round counts.
2. **Classifier** (EfficientNet-B0 of the default config, 96-pixel crops, batches of 32): crops/s,
   MindSpore vs ONNX Runtime.
3. **Training** (``unet_small`` width 16, 128x128 patches, batch 8, BCE+Dice, AdamW): patches/s of
   ``cytocore.trainloop``'s compiled step vs the PyTorch reference (no data loading in either).
4. **Fused inference** of one ``--fused-size``² synthetic field per backend (``infer_speed`` in a
   child process each, so peak RSS is that backend's own): seconds per image and peak RSS.

Ratios are printed next to the figures. Untrained networks: speed does not depend on the weights.
Prints figures; never asserts. The CPU may be shared: compare figures of one run, not across runs.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from . import torch_reference
from .output import emit, run_main

REPO = Path(__file__).resolve().parents[2]


def _load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def interleaved(runners: dict[str, Callable[[], Any]], rounds: int, per_round: float = 2.0) -> dict[str, float]:
    """Median calls/s of each runner, timed in alternating rounds of about ``per_round`` seconds each."""
    calls = {}
    for name, fn in runners.items():  # calibrate: calls per round from one timed call (after warm-up)
        fn()
        t0 = time.perf_counter()
        fn()
        calls[name] = max(1, int(per_round / max(time.perf_counter() - t0, 1e-6)))
    rates: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, fn in runners.items():
            t0 = time.perf_counter()
            for _ in range(calls[name]):
                fn()
            rates[name].append(calls[name] / (time.perf_counter() - t0))
    return {name: statistics.median(r) for name, r in rates.items()}


def _ratio(a: float, b: float) -> float:
    return round(a / b, 2) if b else float("nan")


def bench_unet(args: argparse.Namespace, tmp: Path) -> dict:
    import mindspore as ms
    import numpy as np

    from cytocore.onnx_backend import OnnxNetwork, fixed_batch
    from segmentation.export import export_copy, export_network
    from segmentation.unet import create_unet, resolve_model_config

    cfg = resolve_model_config({"name": "unet_small"})
    net = create_unet(**cfg)
    net.set_train(False)
    twin = create_unet(**cfg)
    ms.load_param_into_net(twin, {p.name: p for p in net.get_parameters()})
    twin.set_train(False)
    twin, swapped = export_copy(twin)
    path = tmp / "unet.onnx"
    report = export_network(net, twin, swapped, path, {}, multiple=2 ** (cfg["depth"] - 1))
    ort_net = OnnxNetwork(path, threads=args.threads)
    x = fixed_batch((4, 3, 256, 256))
    tx = ms.Tensor(x)
    ref = net(tx).asnumpy()
    runners: dict[str, Callable[[], Any]] = {
        "mindspore": lambda: net(tx).asnumpy(),
        "onnxruntime": lambda: ort_net(x),
    }
    diffs = {"onnxruntime": float(np.max(np.abs(ort_net(x) - ref)))}
    if torch_reference.available():
        import torch

        torch.set_num_threads(args.threads)
        tnet = torch_reference.build_unet(cfg).eval()
        torch_reference.copy_weights(net, tnet)
        txt = torch.from_numpy(x)

        def run_torch():
            with torch.inference_mode():
                return tnet(txt).numpy()

        diffs["pytorch"] = float(np.max(np.abs(run_torch() - ref)))
        runners["pytorch"] = run_torch
    rates = interleaved(runners, args.rounds)
    mp = x.shape[0] * x.shape[2] * x.shape[3] / 1e6
    out = {
        "model": "unet_small (depth 4, width 16, batch norm, transposed conv), untrained",
        "batch": list(x.shape),
        "export_check_max_abs_diff": report.max_abs_diff,
        "max_abs_diff_vs_mindspore": diffs,
        "mp_per_s": {k: round(v * mp, 3) for k, v in rates.items()},
        "img_per_s": {k: round(v * x.shape[0], 2) for k, v in rates.items()},
        "ratio_onnxruntime_vs_mindspore": _ratio(rates["onnxruntime"], rates["mindspore"]),
    }
    if "pytorch" in rates:
        out["ratio_onnxruntime_vs_pytorch"] = _ratio(rates["onnxruntime"], rates["pytorch"])
        out["ratio_pytorch_vs_mindspore"] = _ratio(rates["pytorch"], rates["mindspore"])
    return out


def bench_classifier(args: argparse.Namespace, tmp: Path) -> dict:
    import mindspore as ms
    import numpy as np

    from classification.crops import CropConfig
    from classification.export import DYNAMIC_AXES, export_copy
    from classification.model import ModelConfig, build_network
    from cytocore import onnx_backend as ox

    model, crop = ModelConfig(), CropConfig()
    net = build_network(model, 4)
    net.set_train(False)
    twin = build_network(model, 4)
    ms.load_param_into_net(twin, {p.name: p for p in net.get_parameters()})
    twin.set_train(False)
    twin, _ = export_copy(twin)
    path = tmp / "cls.onnx"
    check = ox.fixed_batch((3, 3, crop.size, crop.size))
    report = ox.export_verified(twin, lambda b: net(ms.Tensor(b)), ox.fixed_batch((2, 3, crop.size, crop.size), 1), check,
                                path, {}, dynamic_axes=DYNAMIC_AXES)
    ort_net = ox.OnnxNetwork(path, threads=args.threads)
    x = ox.fixed_batch((32, 3, crop.size, crop.size))
    tx = ms.Tensor(x)
    diff = float(np.max(np.abs(ort_net(x) - net(tx).asnumpy())))
    rates = interleaved({"mindspore": lambda: net(tx).asnumpy(), "onnxruntime": lambda: ort_net(x)}, args.rounds)
    return {
        "model": f"{model.name} (width x{model.width_mult}), {crop.size}px crops, batch 32, untrained",
        "export_check_max_abs_diff": report.max_abs_diff,
        "max_abs_diff_vs_mindspore": diff,
        "crops_per_s": {k: round(v * 32, 1) for k, v in rates.items()},
        "ratio_onnxruntime_vs_mindspore": _ratio(rates["onnxruntime"], rates["mindspore"]),
    }


def bench_training(args: argparse.Namespace) -> dict:
    import mindspore as ms
    import numpy as np

    from cytocore.trainloop import LoopConfig, make_optimizer, make_train_step
    from segmentation.losses import make_loss
    from segmentation.train import load_seg_config
    from segmentation.unet import create_unet, resolve_model_config

    cfg = resolve_model_config({"name": "unet_small"})
    seg_cfg = load_seg_config()
    net = create_unet(**cfg)
    net.set_train(True)
    loop = LoopConfig.from_dict({"epochs": 1, "steps_per_epoch": 10}, seg_cfg["optimizer"])
    step = make_train_step(net, make_loss("binary", 1, seg_cfg["loss"]), make_optimizer(net.trainable_params(), loop))
    rng = np.random.default_rng(0)
    b, p = 8, 128
    xs = rng.standard_normal((b, 3, p, p)).astype(np.float32)
    ys = (rng.random((b, 1, p, p)) > 0.7).astype(np.float32)
    x, y, lr = ms.Tensor(xs), ms.Tensor(ys), ms.Tensor(np.float32(loop.optimizer.lr))
    runners: dict[str, Callable[[], Any]] = {"mindspore": lambda: float(step(lr, x, y).asnumpy())}
    if torch_reference.available():
        import torch

        torch.set_num_threads(args.threads)
        tnet = torch_reference.build_unet(cfg).train()
        opt = torch.optim.AdamW(tnet.parameters(), lr=loop.optimizer.lr, weight_decay=loop.optimizer.weight_decay)
        tx, ty = torch.from_numpy(xs), torch.from_numpy(ys)

        def torch_step():
            opt.zero_grad(set_to_none=True)
            loss = torch_reference.bce_dice_loss(tnet(tx), ty)
            loss.backward()
            opt.step()
            return float(loss.detach())

        runners["pytorch"] = torch_step
    rates = interleaved(runners, max(3, args.rounds // 2), per_round=4.0)
    out = {
        "model": "unet_small (depth 4, width 16), 128x128 patches, batch 8, BCE+Dice, AdamW",
        "jit_level": os.environ.get("CYTOFUSE_JIT_LEVEL", "default"),
        "patches_per_s": {k: round(v * b, 2) for k, v in rates.items()},
    }
    if "pytorch" in rates:
        out["ratio_mindspore_vs_pytorch"] = _ratio(rates["mindspore"], rates["pytorch"])
    return out


def bench_fused(args: argparse.Namespace, tmp: Path) -> dict:
    """One child process per backend: ``infer_speed`` on a synthetic ``--fused-size``² field.

    The untrained checkpoints are made and exported here first, so the ONNX Runtime child only loads
    its models (as a run with exported models beside the checkpoints does) and never imports MindSpore.
    """
    from experiments.commands_export import export_checkpoint

    from .infer_speed import _untrained_checkpoints

    seg, cls = _untrained_checkpoints(tmp, 0.5)
    if args.fused_seg:  # a trained U-Net finds a realistic number of cells (an untrained one finds blobs)
        seg = Path(shutil.copy(args.fused_seg, tmp / "seg_given.ckpt"))  # its model is exported here, not beside it
    for ckpt in (seg, cls):
        export_checkpoint(ckpt)
    out: dict[str, Any] = {}
    for backend in args.fused_backends:
        target = tmp / f"fused_{backend}.json"
        cmd = [sys.executable, "-m", "experiments.benchmarks.infer_speed", "--size", str(args.fused_size),
               "--images", str(args.fused_images), "--threads", str(args.threads), "--backend", backend,
               "--seg", str(seg), "--cls", str(cls), "--json", str(target)]
        try:
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=args.fused_timeout)
        except subprocess.TimeoutExpired:
            out[backend] = {"error": f"not finished within {args.fused_timeout} s (--fused-timeout)"}
            continue
        if proc.returncode != 0 or not target.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            out[backend] = {"error": f"exit {proc.returncode}: {tail[0][:300]}"}
            continue
        fig = json.loads(target.read_text())
        out[backend] = {k: fig.get(k) for k in ("seconds_per_image_median", "seconds_segment_median",
                                                 "seconds_classify_median", "peak_rss_mb", "detections_per_image_median",
                                                 "seconds_first_image_with_compile", "peak_rss_after_setup_mb")}
    ok = all("error" not in v for v in out.values())
    if ok and len(out) == 2:
        out["ratio_speed_onnxruntime_vs_mindspore"] = _ratio(out["mindspore"]["seconds_per_image_median"],
                                                             out["onnxruntime"]["seconds_per_image_median"])
        out["ratio_peak_rss_onnxruntime_vs_mindspore"] = _ratio(out["onnxruntime"]["peak_rss_mb"],
                                                                out["mindspore"]["peak_rss_mb"])
    what = f"trained {args.fused_seg}" if args.fused_seg else "untrained unet_small (scale 0.5)"
    out["image"] = f"{args.fused_size}x{args.fused_size} synthetic field, {what} + untrained efficientnet_b0"
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds per backend (median counts)")
    parser.add_argument("--skip", action="append", default=[], choices=["unet", "cls", "train", "fused"])
    parser.add_argument("--fused-size", type=int, default=2048)
    parser.add_argument("--fused-images", type=int, default=1, help="timed images per backend after a warm-up one")
    parser.add_argument("--fused-backends", nargs="+", default=["mindspore", "onnxruntime"], choices=["mindspore", "onnxruntime"])
    parser.add_argument("--fused-seg", default=None, metavar="CKPT",
                        help="segmentation checkpoint for the fused run (copied; default: untrained unet_small at scale 0.5)")
    parser.add_argument("--fused-timeout", type=float, default=1800, help="seconds before a fused child run is abandoned")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)

    from cytocore import runtime

    runtime.setup(seed=0, threads=args.threads)
    figures: dict[str, Any] = {
        "command": "python -m experiments.benchmarks.backends " + " ".join(sys.argv[1:] if argv is None else argv),
        "threads": args.threads,
        "pytorch_reference": torch_reference.available(),
        "load_average_at_start": _load_average(),
    }
    sections = [("unet", bench_unet), ("cls", bench_classifier), ("train", lambda a, t: bench_training(a)),
                ("fused", bench_fused)]
    with tempfile.TemporaryDirectory(prefix="cytofuse-bench-") as tmp:
        for name, fn in sections:
            if name in args.skip:
                continue
            figures[name] = fn(args, Path(tmp))
            figures[name]["load_average_after"] = _load_average()
            print(json.dumps({name: figures[name]}, indent=2), flush=True)
    figures["versions"] = runtime.runtime_info()
    try:
        import onnxruntime

        figures["versions"]["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    if torch_reference.available():
        import torch

        figures["versions"]["torch"] = torch.__version__
    emit(figures, args.json)
    return 0


if __name__ == "__main__":
    run_main(main)
