"""U-Net (Ronneberger et al. 2015) as a MindSpore ``nn.Cell``, built from a YAML ``model:`` block.

One network serves both systems: ``out_channels=1`` gives the two-stage system's cancer-cell
foreground logit (its sigmoid is the saliency map the challenge scores), ``out_channels=K+1`` gives
the single-stage baseline's per-class logits (0 = background). Size is configurable because the
2-core CPU this runs on makes width and depth the main speed knobs.

``instance_channels`` adds that many 1×1 output channels *after* the ``out_channels`` ones: the
instance head (:mod:`segmentation.instance_targets`), a per-cell normalised distance that tells
touching cells apart. They share the decoder's last features and cost one 1×1 filter each, so
channel 0 stays the foreground logit (the saved explanation map) and the model block stored in the
checkpoint (``instance_channels``) tells prediction how to split the output.

Input height and width must be multiples of ``2 ** (depth - 1)`` (each of the ``depth - 1`` max-pools
halves them and the decoder must land back on the skip connection's exact size).
:meth:`UNet.check_input_size` raises a clear error otherwise; tiled prediction pads tiles to a
multiple (:func:`UNet.input_multiple`).

Graph-mode notes: ``construct`` only uses ``self`` and MindSpore ops (no lambdas, no Python
containers built per call), so the same cell compiles inside the train loop's ``ms.jit`` step.
"""
from __future__ import annotations

import copy
import inspect
from typing import Any, Optional

import mindspore.nn as nn
import mindspore.ops as ops

from cytocore.errors import CytoFuseError

NORMS = ("batch", "group", "none")
UPSAMPLES = ("transpose", "bilinear")


def _norm(kind: str, channels: int, groups: int) -> nn.Cell:
    if kind == "batch":
        return nn.BatchNorm2d(channels, momentum=0.9)
    if kind == "group":
        g = max(1, min(groups, channels))
        while channels % g:
            g -= 1
        return nn.GroupNorm(g, channels)
    return nn.Identity()


class ConvBlock(nn.Cell):
    """Two 3×3 convolutions, each followed by normalisation and ReLU."""

    def __init__(self, in_ch: int, out_ch: int, norm: str = "batch", groups: int = 8) -> None:
        super().__init__()
        bias = norm == "none"  # a bias before a normalisation is absorbed by its shift
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, pad_mode="same", has_bias=bias, weight_init="HeNormal")
        self.norm1 = _norm(norm, out_ch, groups)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, pad_mode="same", has_bias=bias, weight_init="HeNormal")
        self.norm2 = _norm(norm, out_ch, groups)
        self.relu = nn.ReLU()

    def construct(self, x):
        x = self.relu(self.norm1(self.conv1(x)))
        return self.relu(self.norm2(self.conv2(x)))


class Down(nn.Cell):
    """Halve the resolution (2×2 max-pool), then a conv block."""

    def __init__(self, in_ch: int, out_ch: int, norm: str, groups: int) -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
        self.block = ConvBlock(in_ch, out_ch, norm, groups)

    def construct(self, x):
        return self.block(self.pool(x))


class Up(nn.Cell):
    """Double the resolution, concatenate the encoder's skip tensor, then a conv block.

    ``transpose`` learns the upsampling (2×2 stride-2 transposed conv); ``bilinear`` resizes and
    then mixes channels with a 3×3 conv, which avoids transposed-conv checkerboard artefacts.
    """

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int, norm: str, groups: int, mode: str) -> None:
        super().__init__()
        self.bilinear = mode == "bilinear"
        if self.bilinear:
            self.up = nn.Conv2d(in_ch, out_ch, 3, pad_mode="same", has_bias=True, weight_init="HeNormal")
        else:
            self.up = nn.Conv2dTranspose(in_ch, out_ch, 2, stride=2, pad_mode="same", has_bias=True, weight_init="HeNormal")
        self.block = ConvBlock(out_ch + skip_ch, out_ch, norm, groups)

    def construct(self, x, skip):
        if self.bilinear:
            x = ops.interpolate(x, size=(skip.shape[2], skip.shape[3]), mode="bilinear", align_corners=False)
        x = self.up(x)
        return self.block(ops.concat((x, skip), 1))


class UNet(nn.Cell):
    """Encoder-decoder with skip connections; returns logits ``(N, out_channels + instance_channels, H, W)``.

    ``depth`` counts resolution levels (``depth - 1`` down-samplings); level ``i`` has
    ``base_width * 2**i`` channels.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 1,
        depth: int = 4,
        base_width: int = 16,
        norm: str = "batch",
        upsample: str = "transpose",
        groups: int = 8,
        instance_channels: int = 0,
    ) -> None:
        super().__init__()
        if depth < 2:
            raise ValueError(f"depth must be at least 2, got {depth}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
        if upsample not in UPSAMPLES:
            raise ValueError(f"upsample must be one of {', '.join(UPSAMPLES)}, got {upsample!r}")
        if out_channels < 1 or base_width < 1 or in_channels < 1:
            raise ValueError("in_channels, out_channels and base_width must be positive")
        if instance_channels < 0:
            raise ValueError(f"instance_channels must be >= 0, got {instance_channels}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.instance_channels = instance_channels
        self.depth = depth
        self.multiple = 2 ** (depth - 1)
        widths = [base_width * 2**i for i in range(depth)]
        self.stem = ConvBlock(in_channels, widths[0], norm, groups)
        self.downs = nn.CellList([Down(widths[i], widths[i + 1], norm, groups) for i in range(depth - 1)])
        self.ups = nn.CellList(
            [Up(widths[i + 1], widths[i], widths[i], norm, groups, upsample) for i in reversed(range(depth - 1))]
        )
        self.head = nn.Conv2d(widths[0], out_channels + instance_channels, 1, has_bias=True)
        self.n_levels = depth - 1

    def input_multiple(self) -> int:
        """Height and width of an input must be multiples of this."""
        return self.multiple

    def check_input_size(self, height: int, width: int) -> None:
        if height % self.multiple or width % self.multiple or height < self.multiple or width < self.multiple:
            raise ValueError(
                f"U-Net of depth {self.depth} needs input height and width that are multiples of "
                f"{self.multiple}, got {height}x{width}: pad or crop the image first"
            )

    def construct(self, x):
        h = x.shape[2]
        w = x.shape[3]
        if h % self.multiple != 0 or w % self.multiple != 0:
            raise ValueError("U-Net input height and width must be multiples of 2**(depth-1); pad the input first")
        x = self.stem(x)
        skips = [x]
        for down in self.downs:
            x = down(x)
            skips.append(x)
        i = self.n_levels - 1
        for up in self.ups:
            x = up(x, skips[i])
            i -= 1
        return self.head(x)


# ------------------------------------------------------------------------------------ registry

_VARIANTS: dict[str, dict[str, Any]] = {}


def register_variant(name: str, **defaults: Any) -> None:
    """Add a named architecture (mindcv style) that configs can pick with ``model.name``."""
    _check_keys(defaults, f"variant {name!r}")
    _VARIANTS[name] = dict(defaults)


def list_variants() -> list[str]:
    return sorted(_VARIANTS)


def _arg_names() -> list[str]:
    return [p for p in inspect.signature(UNet.__init__).parameters if p != "self"]


def _check_keys(options: dict, where: str) -> None:
    unknown = sorted(set(options) - set(_arg_names()))
    if unknown:
        raise CytoFuseError(f"{where}: unknown model option(s) {', '.join(unknown)} (known: name, {', '.join(_arg_names())})")


register_variant("unet_tiny", depth=3, base_width=8, norm="batch", upsample="transpose")
register_variant("unet_small", depth=4, base_width=16, norm="batch", upsample="transpose")
register_variant("unet_base", depth=5, base_width=32, norm="batch", upsample="transpose")
register_variant("unet_small_gn", depth=4, base_width=16, norm="group", upsample="bilinear")


def resolve_model_config(model_cfg: Optional[dict] = None, **overrides: Any) -> dict:
    """The complete ``model:`` block: the named variant's values, then non-null user values.

    This full form is what checkpoints store, so a model rebuilds identically even if a variant's
    defaults change later.
    """
    cfg = {**copy.deepcopy(model_cfg or {}), **overrides}
    name = cfg.pop("name", None) or "unet_small"
    if name not in _VARIANTS:
        raise CytoFuseError(f"model.name: unknown U-Net variant {name!r} (known: {', '.join(list_variants())})")
    given = {k: v for k, v in cfg.items() if v is not None}
    _check_keys(given, "model")
    defaults = {p.name: p.default for p in inspect.signature(UNet.__init__).parameters.values() if p.name != "self"}
    return {"name": name, **defaults, **_VARIANTS[name], **given}


def create_unet(name: str = "unet_small", **options: Any) -> UNet:
    """Build a U-Net from a config block: ``create_unet(**cfg["model"])``; ``None`` means "variant default"."""
    full = resolve_model_config({"name": name, **options})
    full.pop("name")
    try:
        return UNet(**full)
    except ValueError as exc:
        raise CytoFuseError(f"model: {exc}") from None
