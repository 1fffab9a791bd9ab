"""Sliding-window prediction: tiled == whole image, TTA, memmap output, scale, tiny images, folders."""
from __future__ import annotations

import gc
import logging
import tracemalloc

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import ndimage as ndi
from scipy.special import expit

from cytocore.errors import CytoFuseError
from cytocore.imageio import probability_to_uint8, read_mask
from cytocore.preprocess import to_network_input
from segmentation.postprocess import INSTANCE_COLUMNS
from segmentation.predict import (
    segment_folder,
    _resize_rows,
    _RowResampler,
    _ScaledImage,
    predict_folder,
    predict_probability,
    segment_image,
)


def box_filter(size: int, gain: float = 1.0):
    """A network whose receptive field is ``size``×``size``: zero-padded mean filter of the channel mean."""

    def net(x: np.ndarray) -> np.ndarray:
        s = x.mean(axis=1, keepdims=True)
        return (gain * ndi.uniform_filter(s, size=(1, 1, size, size), mode="constant")).astype(np.float32)

    return net


def kernel_net(kernel: np.ndarray):
    """A zero-padded correlation with ``kernel`` (not flip-symmetric unless the kernel is)."""

    def net(x: np.ndarray) -> np.ndarray:
        s = x.mean(axis=1, keepdims=True)
        return ndi.correlate(s, kernel[None, None], mode="constant").astype(np.float32)

    return net


def whole_image(net, image: np.ndarray) -> np.ndarray:
    """The network applied once to the whole image: the reference for tiled prediction."""
    logits = net(to_network_input(image))
    return expit(logits[0, 0]).astype(np.float32)


def textured(shape, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    img[..., 0] = ((np.sin(yy / 7.0) + np.cos(xx / 11.0)) * 60 + 128).astype(np.uint8)
    return img


@pytest.mark.parametrize(
    "shape,cfg,k",
    [
        ((157, 203), dict(tile=32, context=1, overlap=0.25, batch_size=3), 3),
        ((157, 203), dict(tile=48, context=4, overlap=0.5, batch_size=7, pad_batch="none"), 3),
        ((100, 311), dict(tile=64, context=2, overlap=10, batch_size=16), 5),
        ((40, 25), dict(tile=64, context=2, batch_size=2), 5),  # smaller than one tile
    ],
)
def test_tiled_equals_whole_image_away_from_border(shape, cfg, k):
    image = textured(shape)
    net = box_filter(k, gain=3.0)
    tiled = predict_probability(image, net, cfg).saliency
    ref = whole_image(net, image)
    r = k // 2  # receptive-field radius: only there may the reflect-padded border differ
    assert tiled.shape == shape and tiled.dtype == np.float32
    np.testing.assert_allclose(tiled[r:-r, r:-r], ref[r:-r, r:-r], atol=2e-6)
    assert np.abs(tiled - ref).max() > 1e-4  # ...and the border really does see reflected pixels


def test_context_zero_is_plain_gaussian_blending_without_seams():
    """MONAI's setting: tile-edge outputs get small (never zero) weight, so tiny but smooth deviations."""
    image = textured((150, 190), seed=2)
    net = box_filter(3, gain=3.0)
    tiled = predict_probability(image, net, dict(tile=32, context=0, overlap=0.5)).saliency
    ref = whole_image(net, image)
    diff = np.abs(tiled - ref)[1:-1, 1:-1]
    assert 1e-6 < diff.max() < 2e-3


def test_mindspore_conv_tiled_equals_whole_image():
    from cytocore import runtime

    ms = runtime.setup(seed=0)
    import mindspore.nn as nn

    weight = np.full((1, 3, 3, 3), 1.0 / 9.0, np.float32)
    conv = nn.Conv2d(3, 1, 3, pad_mode="same", has_bias=False, weight_init=ms.Tensor(weight))
    image = textured((90, 130), seed=1)
    cfg = dict(tile=32, context=2, overlap=0.25, batch_size=4)
    tiled = predict_probability(image, conv, cfg).saliency
    conv.set_train(False)
    ref = expit(conv(ms.Tensor(to_network_input(image))).asnumpy()[0, 0])
    np.testing.assert_allclose(tiled[1:-1, 1:-1], ref[1:-1, 1:-1], atol=1e-5)


@pytest.mark.parametrize(
    "pad_batch,expected",
    [("full", [(5, 3, 32, 32)]), ("none", [(3, 3, 32, 32), (5, 3, 32, 32)]), ("pow2", [(4, 3, 32, 32), (5, 3, 32, 32)])],
)
def test_batch_padding_limits_input_shapes(pad_batch, expected):
    shapes = []

    def net(x):
        shapes.append(x.shape)
        return box_filter(3)(x)

    image = textured((90, 150))  # 4 x 7 = 28 tiles: 5 batches of 5 and one of 3
    ref = predict_probability(image, box_filter(3), dict(tile=32, context=2, batch_size=28)).saliency
    got = predict_probability(image, net, dict(tile=32, context=2, batch_size=5, pad_batch=pad_batch)).saliency
    assert sorted(set(shapes)) == expected
    np.testing.assert_allclose(got, ref, atol=1e-6)


def test_padded_batch_size():
    from segmentation.predict import padded_batch_size

    assert [padded_batch_size(n, 8, "pow2") for n in range(1, 10)] == [1, 2, 4, 4, 8, 8, 8, 8, 9]
    assert padded_batch_size(3, 6, "pow2") == 4 and padded_batch_size(5, 6, "pow2") == 6
    assert padded_batch_size(3, 8, "full") == 8 and padded_batch_size(3, 8, "none") == 3


def test_tta_with_flip_equivariant_net_equals_no_tta():
    image = textured((120, 140), seed=4)
    net = box_filter(3, gain=3.0)  # symmetric kernel, symmetric zero padding: flip-equivariant
    plain = predict_probability(image, net, dict(tile=32, context=2)).saliency
    for tta in ("flip", "flip_all", True):
        np.testing.assert_allclose(predict_probability(image, net, dict(tile=32, context=2, tta=tta)).saliency, plain, atol=1e-6)


def test_tta_unflips_the_outputs():
    """For an asymmetric kernel, flip TTA = mean over the kernel and its flips (away from borders)."""
    kernel = np.array([[0, 0, 0], [0, 1, 2], [0, 0, -1]], np.float32)
    image = textured((90, 110), seed=5)
    tta = predict_probability(image, kernel_net(kernel), dict(tile=32, context=2, tta="flip")).saliency
    refs = [whole_image(kernel_net(k), image) for k in (kernel, kernel[:, ::-1], kernel[::-1, :])]
    expected = np.mean(refs, axis=0)
    np.testing.assert_allclose(tta[1:-1, 1:-1], expected[1:-1, 1:-1], atol=2e-6)
    plain = predict_probability(image, kernel_net(kernel), dict(tile=32, context=2)).saliency
    assert np.abs(plain - tta).max() > 0.01


def test_memmap_uint8_plane_matches_in_memory(tmp_path):
    image = textured((230, 170), seed=6)
    net = box_filter(3, gain=3.0)
    cfg = dict(tile=32, context=2, batch_size=3)
    floats = predict_probability(image, net, cfg).saliency
    in_memory = predict_probability(image, net, {**cfg, "dtype": "uint8"}).saliency
    plane = np.memmap(tmp_path / "plane.u8", dtype=np.uint8, mode="w+", shape=image.shape[:2])
    result = predict_probability(image, net, cfg, out=plane)
    assert result.saliency is plane
    plane.flush()
    on_disk = np.fromfile(tmp_path / "plane.u8", dtype=np.uint8).reshape(image.shape[:2])
    np.testing.assert_array_equal(on_disk, in_memory)
    assert np.abs(on_disk.astype(int) - probability_to_uint8(floats).astype(int)).max() <= 1
    f16 = predict_probability(image, net, {**cfg, "dtype": "float16"}).saliency
    assert f16.dtype == np.float16 and np.abs(f16.astype(np.float32) - floats).max() < 1e-3


def _peak_bytes(image, net, cfg, out) -> int:
    gc.collect()  # garbage of earlier tests (MindSpore cells) must not be destroyed while measuring
    tracemalloc.start()
    predict_probability(image, net, cfg, out=out)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak


@pytest.mark.parametrize("batch_size", [4, 12])
def test_memory_bounded_by_strip_not_image(tmp_path, batch_size):
    """Predicting into a uint8 memmap needs the same memory for a 5x taller image: strips, not planes."""
    width, tile = 400, 64
    image = textured((8000, width), seed=7)
    net = box_filter(3)
    cfg = dict(tile=tile, context=4, batch_size=batch_size)
    predict_probability(image[:50, :50], net, cfg)  # imports done before measuring
    peaks = {}
    for height in (1600, 8000):
        plane = np.memmap(tmp_path / f"plane{height}.u8", dtype=np.uint8, mode="w+", shape=(height, width))
        peaks[height] = _peak_bytes(image[:height], net, cfg, plane)
    float_plane = 8000 * width * 4
    assert peaks[8000] < 1.15 * peaks[1600] + 100_000, f"memory grows with the image: {peaks}"
    assert peaks[8000] < float_plane / 4, f"peak {peaks[8000] / 1e6:.2f} MB vs float plane {float_plane / 1e6:.1f} MB"
    reference = predict_probability(image[:300], net, cfg).saliency
    assert np.abs(plane[:250].astype(int) - probability_to_uint8(reference[:250]).astype(int)).max() <= 1


def test_row_resampler_equals_whole_resize():
    rng = np.random.default_rng(0)
    for src, dst in [((50, 40), (173, 120)), ((173, 120), (50, 40)), ((64, 64), (64, 31)), ((7, 9), (1000, 13))]:
        full = rng.random(src).astype(np.float32)
        whole = np.asarray(Image.fromarray(full, mode="F").resize((dst[1], dst[0]), Image.BILINEAR))
        res = _RowResampler(src, dst)
        got = np.zeros(dst, np.float32)
        filled = np.zeros(dst[0], int)
        for a in range(0, src[0], 6):
            out = res.push(full[None, a : a + 6], a)
            if out is not None:
                first, rows = out
                got[first : first + rows.shape[1]] = rows[0]
                filled[first : first + rows.shape[1]] += 1
        assert (filled == 1).all(), "every output row exactly once"
        np.testing.assert_allclose(got, whole, atol=1e-5)
        assert res.buf.shape[1] <= 6 + 2 * (res.margin + int(np.ceil(src[0] / dst[0]))), "keeps a few rows, not the map"


def test_scaled_image_rows_match_whole_resize():
    image = textured((101, 77), seed=8)
    for shape in [(50, 38), (202, 154)]:
        whole = np.asarray(Image.fromarray(image).resize((shape[1], shape[0]), Image.BILINEAR)).astype(int)
        src = _ScaledImage(image, shape)
        for a in range(0, shape[0], 13):
            b = min(shape[0], a + 13)
            assert np.abs(src.rows(a, b).astype(int) - whole[a:b]).max() <= 1  # uint8 rounding only
    assert _resize_rows(np.ones((4, 5), np.float32), 0, (4, 5), (8, 10), 0, 8).shape == (8, 10)


@pytest.mark.parametrize("scale", [0.5, 2.0, 0.37, 1.3])
def test_scale_round_trip_keeps_size_and_matches_manual_resizing(scale):
    image = textured((97, 143), seed=9)
    net = box_filter(3, gain=2.0)
    got = predict_probability(image, net, dict(tile=32, context=2, scale=scale)).saliency
    assert got.shape == image.shape[:2]
    h, w = max(1, round(97 * scale)), max(1, round(143 * scale))
    small = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
    at_scale = predict_probability(small, net, dict(tile=32, context=2)).saliency
    back = np.asarray(Image.fromarray(at_scale, mode="F").resize((143, 97), Image.BILINEAR))
    np.testing.assert_allclose(got, back, atol=5e-3)  # input resized strip-wise may differ by 1 grey level


def test_segmenter_scale_is_used():
    class Segmenter:
        network = staticmethod(box_filter(3))
        scale = 0.5
        out_channels = 1
        class_names = ["cell"]
        meta = {"depth": 4}

    image = textured((64, 80))
    seen = []

    class Spy(Segmenter):
        @staticmethod
        def network(x):
            seen.append(x.shape)
            return box_filter(3)(x)

    res = predict_probability(image, Spy(), dict(tile=32, context=0, batch_size=1))
    assert res.saliency.shape == (64, 80)
    assert len(seen) == 2  # 32x40 at half scale: 1 x 2 tiles
    with pytest.raises(CytoFuseError, match="multiple of 8"):
        predict_probability(image, Segmenter(), dict(tile=36))


@pytest.mark.parametrize("shape", [(1, 1), (5, 300), (300, 5), (2, 2)])
def test_tiny_images(shape):
    image = textured(shape)
    res = segment_image(image, box_filter(3), dict(tile=32, context=2))
    assert res.probability.shape == shape
    assert list(res.instances.columns) == INSTANCE_COLUMNS
    assert res.class_probs is None


def test_blank_image_has_no_instances():
    image = np.full((200, 260, 3), 255, np.uint8)
    res = segment_image(image, box_filter(3, gain=-5.0), dict(tile=64, context=2))
    assert res.instances.empty and list(res.instances.columns) == INSTANCE_COLUMNS
    assert float(res.probability.max()) < 0.5


def cell_net(x: np.ndarray) -> np.ndarray:
    """'Dark means cell': logits from the darkness of the (normalised) tile, smoothed."""
    s = -x.mean(axis=1, keepdims=True)
    return (4.0 * ndi.uniform_filter(s, size=(1, 1, 3, 3), mode="nearest")).astype(np.float32)


def cell_image(shape=(160, 200)):
    img = np.full((*shape, 3), 235, np.uint8)
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    for cy, cx, r in [(40, 50, 14), (40, 76, 14), (110, 140, 18)]:
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 40
    return img


def test_segment_image_finds_cells_and_splits_touching():
    res = segment_image(cell_image(), cell_net, dict(tile=64, context=4))
    assert len(res.instances) == 3
    big = res.instances.sort_values("area").iloc[-1]
    assert abs(big.x0 - 122) <= 1 and abs(big.y0 - 92) <= 1  # the dark disc's box (edge pixels are grey-ish)
    assert res.instances["seg_mean"].between(0.5, 1).all()


def multiclass_net(x: np.ndarray) -> np.ndarray:
    """Background where bright; class 1 on the left half of the image tile, class 2 on the right."""
    dark = -x.mean(axis=1)
    b, h, w = dark.shape
    left = np.zeros((b, h, w), np.float32)
    left[..., : w // 2] = 1
    return np.stack([-4 * dark, 4 * dark * left, 4 * dark * (1 - left)], axis=1).astype(np.float32)


def test_segment_image_multiclass():
    image = np.full((64, 128, 3), 235, np.uint8)
    yy, xx = np.ogrid[:64, :128]
    image[(yy - 32) ** 2 + (xx - 30) ** 2 <= 100] = 30
    image[(yy - 32) ** 2 + (xx - 98) ** 2 <= 100] = 30

    class Segmenter:
        network = staticmethod(multiclass_net)
        scale = 1.0
        out_channels = 3
        class_names = ["SCC", "AC"]
        meta = {}

    # one tile over the whole image, so "left half of the tile" = left half of the image
    res = segment_image(image, Segmenter(), dict(tile=128, context=0))
    assert res.class_maps.shape == (3, 64, 128)
    np.testing.assert_allclose(res.probability, 1 - res.class_maps[0], atol=1e-6)
    inst = res.instances.assign(**res.class_probs).sort_values("x0")
    assert list(inst["class_name"]) == ["SCC", "AC"]
    assert inst.iloc[0]["SCC"] > 0.9 and inst.iloc[1]["AC"] > 0.9


def test_bad_network_output_is_a_clear_error():
    with pytest.raises(CytoFuseError, match="returned shape"):
        predict_probability(textured((40, 40)), lambda x: x[:, :1, ::2, ::2], dict(tile=32, context=2))
    with pytest.raises(CytoFuseError, match="tta"):
        predict_probability(textured((40, 40)), box_filter(3), dict(tta="rotate"))
    with pytest.raises(CytoFuseError, match="tile_size"):
        predict_probability(textured((40, 40)), box_filter(3), dict(tile_size=32))


def _write_images(folder, n=3):
    folder.mkdir()
    for i in range(n):
        Image.fromarray(cell_image((120 + 10 * i, 150))).save(folder / f"img{i:02d}.png")
    (folder / "broken.jpg").write_bytes(b"this is not a jpeg")


def test_predict_folder_skips_corrupt_and_resumes(tmp_path, caplog):
    images, out = tmp_path / "images", tmp_path / "out"
    _write_images(images)
    calls = []

    def net(x):
        calls.append(1)
        return cell_net(x)

    cfg = dict(tile=64, context=4)
    with caplog.at_level(logging.WARNING, logger="cytofuse"):
        table = predict_folder(net, images, out, cfg, progress=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "broken.jpg" in warnings[0] and "\n" not in warnings[0]
    assert list(table.columns) == ["image_id"] + INSTANCE_COLUMNS
    assert sorted(table["image_id"].unique()) == ["img00", "img01", "img02"]
    assert len(table) == 9
    for i in range(3):
        sal = read_mask(out / "saliency" / f"img{i:02d}.png")
        assert sal.shape == (120 + 10 * i, 150)
        assert (out / "instances" / f"img{i:02d}.csv").exists()
    assert not (out / "saliency" / "broken.png").exists()
    on_disk = pd.read_csv(out / "instances.csv", dtype={"image_id": str})
    pd.testing.assert_frame_equal(on_disk, table, check_dtype=False)
    assert not list(out.rglob("*.part*")), "no temporary files left behind"

    # second run: nothing to predict, instances.csv still complete
    calls.clear()
    (out / "instances.csv").unlink()
    again = predict_folder(net, images, out, cfg, progress=False)
    assert calls == []
    pd.testing.assert_frame_equal(again, table, check_dtype=False)
    assert (out / "instances.csv").exists()

    # a half-finished image (CSV without its saliency PNG) is predicted again
    (out / "saliency" / "img01.png").unlink()
    predict_folder(net, images, out, cfg, progress=False)
    assert calls and (out / "saliency" / "img01.png").exists()

    # other settings (or another model) redo every image
    calls.clear()
    run = segment_folder(net, images, out, dict(cfg, overlap=0.5), progress=False)
    assert run.n_processed_now == 3 and run.n_skipped == 0 and len(run.failed) == 1 and run.exit_code == 3


def _untrained_checkpoint(path, mode: str, class_names, seed: int = 0):
    from cytocore import runtime
    from segmentation.unet import create_unet, resolve_model_config

    runtime.setup(seed=seed)
    model = resolve_model_config({"name": "unet_tiny"})
    model["out_channels"] = 1 if mode == "binary" else len(class_names) + 1
    meta = {"stage": "segmentation", "model": model, "class_names": class_names, "mode": mode, "scale": 0.5,
            "input_multiple": 2 ** (model["depth"] - 1), "threshold": 0.5, "config": {}}
    return runtime.save_checkpoint(path, [create_unet(**model)], meta)


@pytest.mark.parametrize("mode", ["binary", "classes"])
def test_predict_folder_with_a_real_checkpoint(tmp_path, mode):
    """The whole contract with segmentation.model_io: load, scale, tile multiple, class names, outputs."""
    from segmentation.model_io import load_segmenter

    names = ["SCC", "AC"]
    ckpt = _untrained_checkpoint(tmp_path / "seg.ckpt", mode, names)
    images = tmp_path / "images"
    _write_images(images, n=2)
    cfg = dict(tile=64, context=4, batch_size=4)
    table = predict_folder(ckpt, images, tmp_path / "out", cfg, {"threshold": 0.0, "min_area": 1}, progress=False)
    for i in range(2):
        assert read_mask(tmp_path / "out" / "saliency" / f"img{i:02d}.png").shape == (120 + 10 * i, 150)
    assert len(table) > 0 and set(table["image_id"]) == {"img00", "img01"}
    if mode == "classes":
        assert {"class_name", "p_SCC", "p_AC"} <= set(table.columns)
        assert set(table["class_name"]) <= set(names)
    # Another checkpoint into the same folder is predicted again, not served the old maps.
    first_map = (tmp_path / "out" / "saliency" / "img00.png").read_bytes()
    other = _untrained_checkpoint(tmp_path / "other.ckpt", mode, names, seed=1)
    run = segment_folder(other, images, tmp_path / "out", cfg, {"threshold": 0.0, "min_area": 1}, progress=False)
    assert run.n_skipped == 0 and run.n_processed_now == 2 and run.exit_code == 3  # broken.jpg failed
    assert (tmp_path / "out" / "saliency" / "img00.png").read_bytes() != first_map
    seg = load_segmenter(ckpt)
    with pytest.raises(CytoFuseError, match="multiple of 4"):
        predict_probability(cell_image(), seg, dict(tile=66, context=4))
