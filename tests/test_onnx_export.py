"""ONNX export of both stages and the ONNX Runtime backend: exported models match MindSpore, a model of
another checkpoint is refused, stale models are exported again, and both backends segment alike.

Networks are tiny and untrained (the weights do not matter for equality); each export compiles a
MindSpore graph for its check batch, so one checkpoint per variant is the cost.
"""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from cytocore import onnx_backend as ox  # noqa: E402
from tests.test_fusion_pipeline import _cells  # noqa: E402

NAMES = ["SCC", "AC", "SCLC", "NSCLC"]

#: Every option the segmentation configs offer, on tiny networks: norm x upsample x channels.
UNET_VARIANTS = {
    "tiny_batch_transpose": {"name": "unet_tiny"},
    "group_bilinear": {"name": "unet_small_gn", "depth": 3, "base_width": 8},
    "none_bilinear_classes": {"name": "unet_tiny", "norm": "none", "upsample": "bilinear", "out_channels": 5},
    "group_transpose_depth4_head": {"name": "unet_small", "norm": "group", "base_width": 8, "groups": 4,
                                    "instance_channels": 1},
}


def _seg_checkpoint(folder, name, options, config=None):
    from cytocore import runtime
    from segmentation.unet import create_unet, resolve_model_config

    runtime.setup(seed=0, threads=2)
    model_cfg = resolve_model_config(dict(options))
    mode = "classes" if model_cfg["out_channels"] > 1 else "binary"
    meta = {"stage": "segmentation", "model": model_cfg, "class_names": NAMES, "mode": mode, "scale": 1.0,
            "threshold": 0.4, "config": config or {"predict": {"tile": 64}}}
    return runtime.save_checkpoint(folder / f"{name}.ckpt", [create_unet(**model_cfg)], meta)


def _cls_checkpoint(folder, name="cls", names=NAMES, seed=0):
    from classification.crops import CropConfig
    from classification.model import ModelConfig, build_network
    from classification.classifier import checkpoint_meta
    from cytocore import runtime

    runtime.setup(seed=seed, threads=2)
    model = ModelConfig(name="efficientnet_b0", width_mult=0.25, depth_mult=0.25, drop_rate=0.0, drop_path_rate=0.0)
    crop = CropConfig(size=32)
    net = build_network(model, len(names))
    _perturb(net, seed)
    return runtime.save_checkpoint(folder / f"{name}.ckpt", [net], checkpoint_meta(model, names, crop))


def _perturb(net, seed):
    """Random weights everywhere: a fresh mindcv network's logits are ~1e-18 (zero-initialised
    residual branches), which would make any comparison vacuous."""
    import mindspore as ms

    rng = np.random.default_rng(seed)
    for p in net.get_parameters():
        value = p.asnumpy()
        noise = rng.standard_normal(value.shape).astype(np.float32) * 0.2
        if "moving_variance" in p.name:
            noise = np.abs(noise)
        p.set_data(ms.Tensor(value + noise))


def _max_rel_diff(a, b):
    return float(np.max(np.abs(a - b))) / max(1.0, float(np.max(np.abs(b))))


@pytest.mark.parametrize("variant", sorted(UNET_VARIANTS))
def test_unet_export_matches_mindspore_at_other_sizes(tmp_path, variant):
    from segmentation.export import export_segmenter, load_onnx_segmenter
    from segmentation.model_io import load_segmenter

    ckpt = _seg_checkpoint(tmp_path, variant, UNET_VARIANTS[variant])
    report = export_segmenter(ckpt)
    assert report.path == ckpt.with_name(ckpt.name + ".onnx") and report.path.is_file()
    assert report.max_abs_diff <= report.allowed
    ms_seg = load_segmenter(ckpt, backend="mindspore")
    ort_seg = load_onnx_segmenter(ckpt, threads=2)
    # a batch size and tile size the export was not traced with: the axes are dynamic
    x = np.random.default_rng(3).standard_normal((5, 3, 48, 80)).astype(np.float32)
    ref, got = ms_seg.logits(x), ort_seg.logits(x)
    assert got.shape == ref.shape == (5, ms_seg.out_channels + ms_seg.instance_channels, 48, 80)
    assert ort_seg.instance_channels == ms_seg.instance_channels == UNET_VARIANTS[variant].get("instance_channels", 0)
    assert _max_rel_diff(got, ref) < ox.DEFAULT_TOLERANCE
    assert ort_seg.scale == ms_seg.scale and ort_seg.threshold == ms_seg.threshold == 0.4
    assert ort_seg.multiple == ms_seg.multiple and ort_seg.mode == ms_seg.mode


def test_unet_model_carries_its_metadata(tmp_path):
    from segmentation.export import export_segmenter

    ckpt = _seg_checkpoint(tmp_path, "seg", {"name": "unet_tiny"}, config={"predict": {"tile": 128}, "train": {"epochs": 3}})
    out = tmp_path / "elsewhere" / "model.onnx"
    export_segmenter(ckpt, out)
    meta = ox.read_metadata(out)
    assert meta["stage"] == "segmentation"
    assert meta["checkpoint_sha256"] == ox.sha256_file(ckpt)
    assert meta["class_names"] == NAMES and meta["scale"] == 1.0 and meta["tile"] == 128
    assert meta["config_sha256"] == ox.config_hash({"predict": {"tile": 128}, "train": {"epochs": 3}})
    assert meta["input"]["mean"] == pytest.approx([123.675, 116.28, 103.53], abs=1e-3)
    assert meta["verification"]["max_abs_diff"] <= meta["verification"]["tolerance"]


def test_classifier_export_matches_mindspore(tmp_path):
    from classification.export import export_classifier, load_onnx_classifier
    from classification.model_io import load_classifier

    ckpt = _cls_checkpoint(tmp_path)
    report = export_classifier(ckpt)
    assert report.path.is_file() and "out_of_place_residual_add" in ox.read_metadata(report.path)["substituted"]
    ms_cls = load_classifier(ckpt, backend="mindspore")
    ort_cls = load_onnx_classifier(ckpt, threads=2)
    crops = np.random.default_rng(5).integers(0, 255, (7, 32, 32, 3), dtype=np.uint8)
    ref, got = ms_cls.logits(crops, batch_size=4), ort_cls.logits(crops, batch_size=4)
    assert got.shape == (7, len(NAMES)) and np.std(ref) > 1e-2  # the logits say something
    assert _max_rel_diff(got, ref) < ox.DEFAULT_TOLERANCE
    tiles = np.random.default_rng(6).integers(0, 255, (2, 56, 56, 3), dtype=np.uint8)  # another size: dynamic H, W
    ref, got = ms_cls.logits(tiles, batch_size=4), ort_cls.logits(tiles, batch_size=4)
    assert _max_rel_diff(got, ref) < ox.DEFAULT_TOLERANCE
    assert ort_cls.class_names == NAMES and ort_cls.crop.size == 32 and ort_cls.head == ms_cls.head


def test_a_model_of_another_checkpoint_or_stage_is_refused(tmp_path):
    from classification.export import export_classifier, load_onnx_classifier
    from segmentation.export import export_segmenter, load_onnx_segmenter

    seg = _seg_checkpoint(tmp_path, "seg", {"name": "unet_tiny"})
    cls_a = _cls_checkpoint(tmp_path, "cls_a", seed=0)
    cls_b = _cls_checkpoint(tmp_path, "cls_b", seed=1)
    seg_model = export_segmenter(seg).path
    model_a = export_classifier(cls_a).path
    with pytest.raises(ox.ModelMismatchError, match="exported from another checkpoint") as info:
        load_onnx_classifier(cls_b, model=model_a)
    assert "cls_b.ckpt" in str(info.value) and "cytofuse export --checkpoint" in str(info.value)
    assert len(str(info.value).splitlines()) == 1
    with pytest.raises(ox.ModelMismatchError, match="segmentation model, not a classification one"):
        load_onnx_classifier(cls_a, model=seg_model)
    with pytest.raises(ox.ModelMismatchError, match="classification model, not a segmentation one"):
        load_onnx_segmenter(seg, model=model_a)


def test_stale_model_is_exported_again_and_read_only_folders_use_the_cache(tmp_path, monkeypatch):
    import os

    from segmentation.export import ensure_model

    seg = _seg_checkpoint(tmp_path, "seg", {"name": "unet_tiny"})
    beside = seg.with_name("seg.ckpt.onnx")
    beside.write_bytes(b"not a model")  # stale/corrupt: replaced
    assert ensure_model(seg) == beside
    assert ox.read_metadata(beside)["checkpoint_sha256"] == ox.sha256_file(seg)
    mtime = beside.stat().st_mtime_ns
    assert ensure_model(seg) == beside and beside.stat().st_mtime_ns == mtime  # matching: reused, not re-exported

    other = _seg_checkpoint(tmp_path / "ro", "seg", {"name": "unet_tiny"})
    cache = tmp_path / "cache"
    monkeypatch.setenv(ox.CACHE_ENV, str(cache))
    real_access = os.access
    monkeypatch.setattr(ox.os, "access", lambda p, mode: False if str(p).startswith(str(other.parent)) else real_access(p, mode))
    path = ensure_model(other)
    assert path.parent == cache and path.is_file() and not other.with_name("seg.ckpt.onnx").exists()


def test_export_refuses_a_model_that_does_not_reproduce_the_network(tmp_path):
    import mindspore as ms

    from cytocore import runtime
    from segmentation.unet import create_unet

    runtime.setup(seed=0, threads=2)
    net = create_unet(name="unet_tiny")
    net.set_train(False)
    out = tmp_path / "bad.onnx"
    x = ox.fixed_batch((2, 3, 16, 24))
    with pytest.raises(ox.ExportError, match="differ from MindSpore's"):
        ox.export_verified(net, lambda b: net(ms.Tensor(b)).asnumpy() + 0.5, x, x, out, {}, dynamic_axes={0: "batch"})
    assert not out.exists() and not list(tmp_path.glob(".bad*"))


def test_backends_give_the_same_cells(tmp_path):
    from segmentation.model_io import load_segmenter
    from segmentation.predict import segment_image

    ckpt = _seg_checkpoint(tmp_path, "seg", {"name": "unet_tiny"})
    rng = np.random.default_rng(0)
    image = np.full((90, 120, 3), 220, np.uint8)
    yy, xx = np.mgrid[:90, :120]
    for _ in range(6):
        cy, cx, r = rng.integers(10, 80), rng.integers(10, 110), rng.integers(4, 9)
        image[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = (90, 60, 140)
    cfg = {"tile": 64, "context": 8, "batch_size": 4}
    post = {"threshold": 0.45, "min_area": 4}
    a = segment_image(image, load_segmenter(ckpt, backend="mindspore"), cfg, post)
    b = segment_image(image, load_segmenter(ckpt, backend="onnxruntime"), cfg, post)
    assert np.max(np.abs(a.probability - b.probability)) < 1e-4
    assert a.instances[["x0", "y0", "x1", "y1"]].equals(b.instances[["x0", "y0", "x1", "y1"]])


def test_cli_export_reads_the_stage_from_the_checkpoint(tmp_path, capsys):
    from experiments.cli import run

    ckpt = _cls_checkpoint(tmp_path)
    assert run(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "c.onnx")]) == 0
    assert "wrote" in capsys.readouterr().out and ox.read_metadata(tmp_path / "c.onnx")["stage"] == "classification"
    bogus = tmp_path / "plain.ckpt"
    from cytocore import runtime
    from segmentation.unet import create_unet

    runtime.save_checkpoint(bogus, [create_unet(name="unet_tiny")], {})
    assert run(["export", "--checkpoint", str(bogus)]) == 2
    assert "cannot export a checkpoint with no CytoFuse metadata" in capsys.readouterr().err


def test_cli_infer_gives_the_same_detections_with_both_backends(tmp_path, capsys):
    import pandas as pd
    from PIL import Image

    from experiments.cli import run

    seg = _seg_checkpoint(tmp_path, "seg", {"name": "unet_tiny"})
    cls = _cls_checkpoint(tmp_path)
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(_cells(1, (90, 120), count=6, background=220)).save(images / "field.png")
    sets = ["--set", "segmentation.predict.tile=64", "--set", "segmentation.predict.context=8",
            "--set", "segmentation.postprocess.threshold=0.45", "--set", "segmentation.postprocess.min_area=4"]
    tables = {}
    for backend in ("mindspore", "onnxruntime"):
        out = tmp_path / backend
        code = run(["infer", "--seg", str(seg), "--cls", str(cls), "--images", str(images), "--out", str(out),
                    "--backend", backend, "--no-progress", *sets])
        assert code == 0, capsys.readouterr().err
        tables[backend] = pd.read_csv(out / "detections.csv")
    a, b = tables["mindspore"], tables["onnxruntime"]
    assert len(a) > 0 and len(a) == len(b)
    boxes = [c for c in a.columns if c in ("x0", "y0", "x1", "y1")]
    assert boxes and a[boxes].equals(b[boxes])
    scores = [c for c in a.columns if c.startswith("p_") or c.endswith("score")]
    assert scores and np.allclose(a[scores].to_numpy(float), b[scores].to_numpy(float), atol=1e-4)
    assert seg.with_name("seg.ckpt.onnx").is_file() and cls.with_name("cls.ckpt.onnx").is_file()
