"""The U-Net and its losses: shapes, gradients reaching every weight, learning, clear errors."""
from __future__ import annotations

import numpy as np
import pytest

from cytocore import runtime
from cytocore.errors import CytoFuseError

ms = runtime.setup(seed=0)
import mindspore.nn as nn  # noqa: E402

from segmentation.losses import BCEDiceLoss, CEDiceLoss, class_weights_from_counts  # noqa: E402
from segmentation.unet import UNet, create_unet, list_variants, resolve_model_config  # noqa: E402


def _x(n=2, h=32, w=48, seed=0):
    return ms.Tensor(np.random.default_rng(seed).normal(size=(n, 3, h, w)).astype(np.float32))


@pytest.mark.parametrize(
    "depth,upsample,norm,out_channels",
    [(2, "transpose", "batch", 1), (3, "bilinear", "group", 5), (4, "transpose", "none", 3), (4, "bilinear", "batch", 1)],
)
def test_output_shape(depth, upsample, norm, out_channels):
    runtime.setup(seed=0)
    net = create_unet(name="unet_small", depth=depth, base_width=4, upsample=upsample, norm=norm, out_channels=out_channels)
    net.set_train(False)
    y = net(_x())
    assert y.shape == (2, out_channels, 32, 48)
    assert np.isfinite(y.asnumpy()).all()
    assert net.input_multiple() == 2 ** (depth - 1)


def _bce_loss(net, x, y):
    return BCEDiceLoss()(net(x), y)


@pytest.mark.parametrize("upsample", ["transpose", "bilinear"])
def test_gradients_reach_every_parameter(upsample):
    runtime.setup(seed=0)
    net = create_unet(depth=3, base_width=4, upsample=upsample, norm="batch")
    net.set_train(True)
    x = _x(2, 16, 16)
    y = ms.Tensor((np.random.default_rng(1).random((2, 1, 16, 16)) > 0.7).astype(np.float32))
    loss_cell = BCEDiceLoss()

    def forward(inputs, target):
        return loss_cell(net(inputs), target)

    params = net.trainable_params()
    grad_fn = ms.value_and_grad(forward, None, params)
    _, grads = grad_fn(x, y)
    assert len(grads) == len(params)
    dead = [p.name for p, g in zip(params, grads) if not np.abs(g.asnumpy()).sum() > 0]
    assert not dead, f"no gradient for {dead}"


@pytest.mark.parametrize("mode", ["binary", "classes"])
def test_one_step_lowers_the_loss_on_a_fixed_batch(mode):
    runtime.setup(seed=0)
    out = 1 if mode == "binary" else 3
    net = create_unet(depth=3, base_width=8, out_channels=out)
    net.set_train(True)
    rng = np.random.default_rng(2)
    x = ms.Tensor(rng.normal(size=(4, 3, 32, 32)).astype(np.float32))
    if mode == "binary":
        loss = BCEDiceLoss()
        y = ms.Tensor((rng.random((4, 1, 32, 32)) > 0.8).astype(np.float32))
    else:
        loss = CEDiceLoss(3)
        y = ms.Tensor(rng.integers(0, 3, (4, 32, 32)).astype(np.int32))

    def forward(inputs, target):
        return loss(net(inputs), target)

    opt = nn.Adam(net.trainable_params(), learning_rate=1e-3)
    grad_fn = ms.value_and_grad(forward, None, opt.parameters)
    before, grads = grad_fn(x, y)
    opt(grads)
    after = forward(x, y)
    assert float(after.asnumpy()) < float(before.asnumpy())


def test_input_size_must_be_a_multiple():
    runtime.setup(seed=0)
    net = create_unet(depth=3, base_width=4)
    net.set_train(False)
    with pytest.raises(ValueError, match="multiples of 2\\*\\*\\(depth-1\\)"):
        net(_x(1, 30, 32))
    with pytest.raises(ValueError, match="multiples of 4, got 30x32"):
        net.check_input_size(30, 32)


def test_registry_and_config_errors():
    assert {"unet_tiny", "unet_small", "unet_base"} <= set(list_variants())
    full = resolve_model_config({"name": "unet_tiny", "depth": None, "base_width": 12})
    assert full["depth"] == 3 and full["base_width"] == 12 and full["name"] == "unet_tiny"
    net = create_unet(**full)  # the stored full form rebuilds the same network
    assert isinstance(net, UNet) and net.depth == 3
    with pytest.raises(CytoFuseError, match="unknown model option.*widht"):
        create_unet(widht=8)
    with pytest.raises(CytoFuseError, match="unknown U-Net variant 'unet_huge'"):
        create_unet(name="unet_huge")
    with pytest.raises(CytoFuseError, match="norm must be one of"):
        create_unet(norm="layer")


def test_cross_entropy_part_matches_numpy():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
    target = rng.integers(0, 3, (2, 4, 5)).astype(np.int32)
    got = float(CEDiceLoss(3, dice_weight=0.0)(ms.Tensor(logits), ms.Tensor(target)).asnumpy())
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    want = -np.take_along_axis(logp, target[:, None], axis=1).mean()
    assert got == pytest.approx(want, rel=1e-5)


def test_dice_term_is_zero_for_a_perfect_prediction():
    target = np.zeros((1, 1, 8, 8), np.float32)
    target[0, 0, 2:6, 2:6] = 1
    logits = np.where(target > 0, 30.0, -30.0).astype(np.float32)
    loss = BCEDiceLoss(bce_weight=0.0, smooth=0.0)(ms.Tensor(logits), ms.Tensor(target))
    assert float(loss.asnumpy()) == pytest.approx(0.0, abs=1e-5)
    wrong = BCEDiceLoss(bce_weight=0.0, smooth=0.0)(ms.Tensor(-logits), ms.Tensor(target))
    assert float(wrong.asnumpy()) == pytest.approx(1.0, abs=1e-5)


def test_class_weights_favour_rare_classes():
    w = class_weights_from_counts(np.array([1000, 100, 10, 0]))
    assert w[2] > w[1] > w[0] and w[3] == 1.0
