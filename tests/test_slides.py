"""Whole-slide reading (tiffslide), tissue masks, lazy level-0 arrays, blank-tile skipping, µm/px scale rules."""
from __future__ import annotations

import numpy as np
import pytest

from cytocore.errors import CytoFuseError
from cytocore.mpp import checkpoint_mpp, dataset_mpp, resolve_scale, training_mpp
from cytocore.slides import (GLASS_FILL, LazyRGB, Slide, array_source, is_slide, slide_source, thumbnail_of_array,
                             tissue_from_thumbnail)

pytest.importorskip("tiffslide", reason="the [slides] extra (tiffslide) is not installed")


def write_pyramid(path, image: np.ndarray, mpp: float = 0.5, levels: int = 3, tile: int = 128) -> None:
    """A tiled pyramidal RGB TIFF with µm/px in its resolution tags, as scanners' generic TIFF export."""
    from experiments.benchmarks.slide_memory import write_pyramid as write

    write(path, image, mpp, levels=levels, tile=tile)


def _tissue_on_glass(h=600, w=900):
    rng = np.random.default_rng(0)
    img = np.full((h, w, 3), 255, np.uint8)  # clean glass
    y0, y1, x0, x1 = h * 128 // 600, h * 384 // 600, w * 256 // 900, w * 640 // 900
    img[y0:y1, x0:x1] = rng.integers(60, 200, (y1 - y0, x1 - x0, 3), dtype=np.uint8)  # stained tissue
    return img


def test_pyramidal_tiff_is_a_slide_with_its_mpp_and_exact_level0_pixels(tmp_path):
    img = _tissue_on_glass()
    write_pyramid(tmp_path / "s.tif", img, mpp=0.25)
    from PIL import Image

    Image.fromarray(img).save(tmp_path / "plain.tif")
    assert is_slide(tmp_path / "s.tif") and not is_slide(tmp_path / "plain.tif")
    slide = Slide(tmp_path / "s.tif")
    assert (slide.width, slide.height) == (900, 600) and slide.mpp == pytest.approx(0.25)
    lazy = slide_source(slide)
    assert lazy.shape == img.shape and lazy.dtype == np.uint8
    assert (lazy[100:300, 200:700] == img[100:300, 200:700]).all()
    assert (lazy[::37, ::41] == img[::37, ::41]).all()  # strided samples read only the rows asked for
    assert slide.thumbnail(8).shape == (75, 113, 3)
    with pytest.raises(MemoryError):
        np.asarray(lazy)


def test_tissue_mask_fills_glass_and_skips_decoding_it():
    img = _tissue_on_glass()
    tissue = tissue_from_thumbnail(thumbnail_of_array(img, 8), 8, margin=16)
    assert 0.1 < tissue.fraction < 0.6
    reads = []

    def read(x0, y0, x1, y1):
        reads.append((x0, y0, x1, y1))
        return img[y0:y1, x0:x1]

    lazy = LazyRGB(read, 900, 600, tissue)
    assert (lazy[0:64, 0:128] == GLASS_FILL).all() and not reads  # glass: not decoded
    region = lazy[100:400, 200:700]
    assert (region[28:284, 56:440] == img[128:384, 256:640]).all()  # tissue pixels untouched
    assert len(reads) == 1 and lazy.regions_skipped == 1


def test_glass_only_tiles_skip_the_network():
    from segmentation.blank_tiles import BlankTileSkipper

    calls = []

    def net(batch):
        calls.append(len(batch))
        return np.ones((len(batch), 1, *batch.shape[2:]), np.float32)

    skip = BlankTileSkipper(net, max_batch=8)
    batch = np.zeros((4, 3, 16, 16), np.float32)
    batch[1] = np.random.default_rng(0).normal(size=(3, 16, 16))
    out = skip(batch)
    assert out.shape == (4, 1, 16, 16)
    assert (out[1] == 1).all() and (out[[0, 2, 3]] < -10).all()  # blank tiles: certainly background
    assert skip.tiles_skipped == 3 and sum(calls) >= 1
    multi = BlankTileSkipper(lambda b: np.zeros((len(b), 3, *b.shape[2:]), np.float32))
    out = multi(np.zeros((2, 3, 8, 8), np.float32))
    assert (out[:, 0] > 10).all() and (out[:, 1:] < -10).all()  # softmax models: background channel wins


def test_plain_array_source_matches_numpy_slicing():
    img = np.random.default_rng(1).integers(0, 255, (50, 70, 3), dtype=np.uint8)
    lazy = array_source(img)
    for key in [(slice(3, 20), slice(5, 60)), (slice(None, None, 3), slice(1, None, 4)), (7,), (7, 9), (slice(None), 4),
                (slice(-5, None), slice(-3, None), 1)]:
        assert (lazy[key] == img[key]).all(), key


def test_scale_rules():
    # physical scale: a model trained at 0.25 µm/px with its own scale 0.5, on a 0.5 µm/px slide
    choice = resolve_scale(0.5, 0.25, 0.5, is_slide=True)
    assert choice.scale == pytest.approx(1.0) and "0.5 µm/px input" in choice.reason
    assert resolve_scale(0.5, 0.25, 0.5, user_scale=0.3).scale == 0.3  # the user's choice wins
    assert resolve_scale(0.5, 0.5, None).scale == 0.5  # plain image: training magnification
    with pytest.raises(CytoFuseError, match="no µm per pixel in its metadata and no --mpp"):
        resolve_scale(0.5, None, None, is_slide=True, name="a.svs")
    with pytest.raises(CytoFuseError, match="records no training µm/px"):
        resolve_scale(0.5, None, 0.25, name="a.svs")


def test_training_mpp_from_config_or_metadata(tmp_path):
    (tmp_path / "metadata.csv").write_text("image_id,width,height,mpp\na,10,10,0.25\nb,10,10,0.25\n")
    assert dataset_mpp(tmp_path) == 0.25
    assert training_mpp(0.5, tmp_path) == 0.5 and training_mpp(None, tmp_path) == 0.25
    assert training_mpp(None, tmp_path / "nothing") is None
    (tmp_path / "metadata.csv").write_text("image_id,width,height,mpp\na,10,10,0.25\nb,10,10,0.5\n")
    with pytest.raises(CytoFuseError, match="different values"):
        dataset_mpp(tmp_path)
    with pytest.raises(CytoFuseError, match="positive"):
        training_mpp(-1, None)
    assert checkpoint_mpp({"mpp": 0.25}) == 0.25 and checkpoint_mpp({"config": {"data": {"mpp": 0.5}}}) == 0.5
    assert checkpoint_mpp({}) is None


def test_tiled_prediction_and_crops_read_a_lazy_slide_like_the_array(tmp_path):
    from classification.crops import CropConfig, extract_crops
    from segmentation.predict import predict_probability

    img = _tissue_on_glass(300, 420)
    write_pyramid(tmp_path / "s.tif", img, mpp=0.5)
    lazy = slide_source(Slide(tmp_path / "s.tif"))

    def net(batch):  # a fixed "network": darker pixels are more foreground
        return (0.5 - batch.mean(axis=1, keepdims=True)).astype(np.float32)

    cfg = {"tile": 64, "context": 8, "batch_size": 3, "scale": 0.5}
    a = predict_probability(img, net, cfg).saliency
    b = predict_probability(lazy, net, cfg).saliency
    assert np.array_equal(a, b)
    boxes = np.array([[260, 130, 300, 170], [0, 0, 30, 20], [400, 280, 420, 300]], np.float32)
    crop_cfg = CropConfig(size=32)
    assert np.array_equal(extract_crops(img, boxes, crop_cfg), extract_crops(lazy, boxes, crop_cfg))


def test_openslide_backend_reads_the_same_level0_pixels(tmp_path):
    pytest.importorskip("openslide", reason="the [openslide] extra is not installed")
    img = _tissue_on_glass(300, 420)
    write_pyramid(tmp_path / "s.tif", img, mpp=0.5)
    slide = Slide(tmp_path / "s.tif", backend="openslide")
    assert slide.backend == "openslide" and slide.mpp == pytest.approx(0.5)
    assert (slide.read(10, 20, 300, 250) == img[20:250, 10:300]).all()
    assert slide.thumbnail(8).shape == (38, 53, 3)
