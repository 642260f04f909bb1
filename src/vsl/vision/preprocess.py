"""The Caffe test-time preprocessing of the BUTD detector: BGR, mean subtraction, the 600 / 1000 scale rule.

As ``fast_rcnn.test._get_blobs`` of bottom-up-attention: the image (RGB, as a viewer shows it) is
reversed to BGR, converted to float32, the pixel means :data:`~vsl.vision.spec.PIXEL_MEANS_BGR` are
subtracted, and it is resized by one factor so that the shorter side is
:data:`~vsl.vision.spec.TEST_SCALE` unless the longer side would then round above
:data:`~vsl.vision.spec.TEST_MAX_SIZE`, in which case the longer side is that maximum. The resize is
bilinear with ``align_corners=False`` and no antialiasing (``torch.nn.functional.interpolate``),
the interpolation the reference port's golden outputs were made with.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F

from . import spec


def image_scale(height: int, width: int, target: int = spec.TEST_SCALE,
                max_size: int = spec.TEST_MAX_SIZE) -> float:
    """The resize factor of a ``height`` x ``width`` image (Python floats, as the Caffe code's).

    ``target / shorter``, unless ``round(that * longer) > max_size``, then ``max_size / longer``.
    ``round`` is NumPy's (half to even), as ``np.round`` in ``_get_blobs``: a 400 x 667 image gives
    1.5 x 667 = 1000.5, which rounds to 1000 and keeps the factor 1.5.
    """
    shorter, longer = min(height, width), max(height, width)
    scale = float(target) / float(shorter)
    if np.round(scale * longer) > max_size:
        scale = float(max_size) / float(longer)
    return scale


def scaled_size(height: int, width: int, scale: float) -> Tuple[int, int]:
    """The network input's ``(round(height * scale), round(width * scale))`` (half to even)."""
    return int(np.round(height * scale)), int(np.round(width * scale))


def preprocess(image: np.ndarray, device: torch.device | str = "cpu") -> Tuple[torch.Tensor, float]:
    """A network input blob from an RGB image.

    ``image``: (H, W, 3) uint8 RGB. Returns ``(blob, scale)``: ``blob`` (1, 3, H', W') float32 BGR
    minus the pixel means, ``H', W' = scaled_size(H, W, scale)``; ``scale`` the factor of
    :func:`image_scale` (boxes in input pixels / ``scale`` = original pixels).
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {image.dtype} {image.shape}")
    height, width = image.shape[:2]
    scale = image_scale(height, width)
    size = scaled_size(height, width, scale)
    bgr = torch.from_numpy(np.ascontiguousarray(image[:, :, ::-1])).to(device)
    means = torch.tensor(spec.PIXEL_MEANS_BGR, dtype=torch.float32, device=device)
    blob = (bgr.to(torch.float32) - means).permute(2, 0, 1).unsqueeze(0)        # (1, 3, H, W)
    blob = F.interpolate(blob, size=size, mode="bilinear", align_corners=False, antialias=False)
    return blob.contiguous(), scale
