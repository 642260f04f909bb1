"""The ResNet-101 of the BUTD detector: Caffe-style stem, stride in the 1x1 convolutions, frozen batch norm.

Module and buffer names are those of the reference port's state dict (``conv1.weight``,
``conv1.norm.running_mean``, ``shortcut`` ...), so its weights load as they are. Every weight is a
buffer: the detector is only ever run for inference. A convolution and its batch norm can be folded
into one convolution with a bias (:meth:`ConvNorm.fold`), which removes one pass over every
activation; the stored statistics stay in the state dict.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import spec


class FrozenBatchNorm2d(nn.Module):
    """Batch norm from stored statistics: ``(x - running_mean) / sqrt(running_var + eps) * weight + bias``."""

    def __init__(self, channels: int, eps: float = spec.BATCH_NORM_EPS) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(channels))
        self.register_buffer("bias", torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def scale_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(C,) multiplier and offset of the affine map this norm is, in float32."""
        scale = self.weight.float() / torch.sqrt(self.running_var.float() + self.eps)
        return scale, self.bias.float() - self.running_mean.float() * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class ConvNorm(nn.Module):
    """A bias-free convolution followed by :class:`FrozenBatchNorm2d` (the port's ``Conv2d(norm=BN)``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, dilation: int = 1) -> None:
        super().__init__()
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.register_buffer("weight", torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.norm = FrozenBatchNorm2d(out_channels)
        self.folded_weight: Optional[torch.Tensor] = None
        self.folded_bias: Optional[torch.Tensor] = None

    def fold(self) -> None:
        """Fold the batch norm into the convolution (weights scaled per output channel, plus a bias)."""
        scale, shift = self.norm.scale_shift()
        dtype = self.weight.dtype
        weight = (self.weight.float() * scale[:, None, None, None]).to(dtype)
        # Channels-last like the activations, so that oneDNN / cuDNN do not reorder it at every call.
        self.folded_weight = weight.contiguous(memory_format=torch.channels_last)
        self.folded_bias = shift.to(dtype)

    def unfold(self) -> None:
        self.folded_weight = self.folded_bias = None

    def _apply(self, fn, recurse=True):  # keep the folded copies on the module's device / dtype
        super()._apply(fn, recurse)
        if self.folded_weight is not None:
            self.fold()
        return self

    def forward(self, x: torch.Tensor, split: int = 1) -> torch.Tensor:
        """``split``: ``x`` holds the ``split x split`` interleaved sub-grids of the map as separate images
        (region ``n``'s sub-grid ``(a, b)`` = cells ``(a::split, b::split)``), on which the dilated convolution is one with dilation / split."""
        padding, dilation = self.padding // split, self.dilation // split
        if self.folded_weight is not None:
            return F.conv2d(x, self.folded_weight, self.folded_bias, self.stride, padding, dilation)
        return self.norm(F.conv2d(x, self.weight, None, self.stride, padding, dilation))


class Bottleneck(nn.Module):
    """ResNet bottleneck, stride in the first 1x1 convolution (MSRA / Caffe ResNet), optional dilation.

    (N, in_channels, H, W) -> (N, out_channels, H / stride, W / stride).
    """

    def __init__(self, in_channels: int, bottleneck_channels: int, out_channels: int, stride: int = 1,
                 dilation: int = 1) -> None:
        super().__init__()
        self.shortcut = ConvNorm(in_channels, out_channels, 1, stride) if in_channels != out_channels else None
        self.conv1 = ConvNorm(in_channels, bottleneck_channels, 1, stride)
        self.conv2 = ConvNorm(bottleneck_channels, bottleneck_channels, 3, 1, padding=dilation, dilation=dilation)
        self.conv3 = ConvNorm(bottleneck_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, split: int = 1) -> torch.Tensor:
        """``split`` > 1: ``x`` holds the interleaved sub-grids of that factor (which must divide the
        dilation); every convolution but the 3x3 is pointwise, so only that one changes."""
        out = F.relu_(self.conv1(x))
        out = F.relu_(self.conv2(out, split))
        out = self.conv3(out)
        out += self.shortcut(x) if self.shortcut is not None else x
        return F.relu_(out)


def make_stage(name: str, in_channels: int, width: int) -> nn.Sequential:
    """Stage ``name`` ("res2" ... "res5") of a ResNet-101 whose stem has ``width`` channels."""
    out_channels = spec.STAGE_OUT_PER_WIDTH[name] * width
    bottleneck = out_channels // spec.BOTTLENECK_EXPANSION
    blocks = []
    for i in range(spec.BLOCKS_PER_STAGE[name]):
        stride = spec.FIRST_STRIDE[name] if i == 0 else 1
        blocks.append(Bottleneck(in_channels, bottleneck, out_channels, stride, spec.DILATION[name]))
        in_channels = out_channels
    return nn.Sequential(*blocks)


class Stem(nn.Module):
    """7x7 / 2 convolution, batch norm, ReLU, then Caffe's 3x3 / 2 max pool rounding up (``ceil_mode``)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = ConvNorm(3, width, spec.STEM_KERNEL, spec.STEM_STRIDE, spec.STEM_PADDING)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu_(self.conv1(x))
        return F.max_pool2d(x, spec.STEM_POOL_KERNEL, spec.STEM_POOL_STRIDE, 0, ceil_mode=True)


class Backbone(nn.Module):
    """Stem + res2 + res3 + res4: (N, 3, H, W) BGR blob -> (N, 16 * width, ~H / 16, ~W / 16) res4 map."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.stem = Stem(width)
        self.res2 = make_stage("res2", width, width)
        self.res3 = make_stage("res3", spec.STAGE_OUT_PER_WIDTH["res2"] * width, width)
        self.res4 = make_stage("res4", spec.STAGE_OUT_PER_WIDTH["res3"] * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res4(self.res3(self.res2(self.stem(x))))
