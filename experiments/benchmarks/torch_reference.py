"""The project's U-Net rebuilt in PyTorch, as a speed reference for the backend benchmark only.

PyTorch is never a CytoFuse dependency: :func:`available` says whether it is importable, and the
benchmark skips its PyTorch columns otherwise. The module mirrors ``segmentation.unet.UNet`` layer for
layer (same widths, padding, normalisation and upsampling) and :func:`copy_weights` loads a MindSpore
U-Net's weights into it, so the benchmark can show both compute the same before timing them.
"""
from __future__ import annotations

from typing import Any


def available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def build_unet(cfg: dict) -> Any:
    """A ``torch.nn.Module`` with the architecture of ``segmentation.unet.create_unet(**cfg)`` (resolved cfg)."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    def norm(kind: str, ch: int, groups: int) -> nn.Module:
        if kind == "batch":
            return nn.BatchNorm2d(ch, momentum=0.1, eps=1e-5)
        if kind == "group":
            g = max(1, min(groups, ch))
            while ch % g:
                g -= 1
            return nn.GroupNorm(g, ch, eps=1e-5)
        return nn.Identity()

    class ConvBlock(nn.Module):
        def __init__(self, cin: int, cout: int, kind: str, groups: int) -> None:
            super().__init__()
            bias = kind == "none"
            self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=bias)
            self.norm1 = norm(kind, cout, groups)
            self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=bias)
            self.norm2 = norm(kind, cout, groups)

        def forward(self, x):
            x = F.relu(self.norm1(self.conv1(x)))
            return F.relu(self.norm2(self.conv2(x)))

    class Down(nn.Module):
        def __init__(self, cin: int, cout: int, kind: str, groups: int) -> None:
            super().__init__()
            self.block = ConvBlock(cin, cout, kind, groups)

        def forward(self, x):
            return self.block(F.max_pool2d(x, 2))

    class Up(nn.Module):
        def __init__(self, cin: int, skip: int, cout: int, kind: str, groups: int, mode: str) -> None:
            super().__init__()
            self.bilinear = mode == "bilinear"
            self.up = nn.Conv2d(cin, cout, 3, padding=1) if self.bilinear else nn.ConvTranspose2d(cin, cout, 2, stride=2)
            self.block = ConvBlock(cout + skip, cout, kind, groups)

        def forward(self, x, skip):
            if self.bilinear:
                x = F.interpolate(x, size=skip.shape[2:], mode="bilinear", align_corners=False)
            return self.block(torch.cat([self.up(x), skip], 1))

    class UNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            depth, base, kind = int(cfg["depth"]), int(cfg["base_width"]), cfg["norm"]
            groups, mode = int(cfg.get("groups", 8)), cfg["upsample"]
            widths = [base * 2**i for i in range(depth)]
            self.stem = ConvBlock(int(cfg.get("in_channels", 3)), widths[0], kind, groups)
            self.downs = nn.ModuleList([Down(widths[i], widths[i + 1], kind, groups) for i in range(depth - 1)])
            self.ups = nn.ModuleList([Up(widths[i + 1], widths[i], widths[i], kind, groups, mode) for i in reversed(range(depth - 1))])
            self.head = nn.Conv2d(widths[0], int(cfg.get("out_channels", 1)), 1)

        def forward(self, x):
            x = self.stem(x)
            skips = [x]
            for down in self.downs:
                x = down(x)
                skips.append(x)
            for i, up in enumerate(self.ups):
                x = up(x, skips[len(skips) - 2 - i])
            return self.head(x)

    return UNet()


_RENAME = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_variance": "running_var"}


def copy_weights(ms_net: Any, torch_net: Any) -> int:
    """Load a MindSpore U-Net's parameters (and BatchNorm statistics) into the PyTorch mirror; returns the count."""
    import torch

    state = torch_net.state_dict()
    loaded = 0
    for param in ms_net.get_parameters():
        parts = param.name.split(".")
        parts[-1] = _RENAME.get(parts[-1], parts[-1])
        key = ".".join(parts)
        if key in state and tuple(state[key].shape) == tuple(param.shape):
            state[key] = torch.from_numpy(param.asnumpy().copy())
            loaded += 1
    torch_net.load_state_dict(state)
    return loaded


def bce_dice_loss(logits: Any, target: Any, smooth: float = 1.0) -> Any:
    """Binary cross-entropy plus soft Dice, as ``segmentation.losses.BCEDiceLoss`` with its defaults."""
    import torch
    import torch.nn.functional as F

    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits)
    inter = (p * target).sum(dim=(1, 2, 3))
    dice = 1 - (2 * inter + smooth) / (p.sum(dim=(1, 2, 3)) + target.sum(dim=(1, 2, 3)) + smooth)
    return bce + dice.mean()
