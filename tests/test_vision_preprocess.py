"""The Caffe test preprocessing of vsl.vision: the 600 / 1000 scale rule, BGR, means, the blob's shape."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vsl.vision import image_scale, preprocess, scaled_size
from vsl.vision.spec import PIXEL_MEANS_BGR


@pytest.mark.parametrize("h,w,scale,size", [
    (480, 640, 600 / 480, (600, 800)),             # shorter side to 600
    (640, 480, 600 / 480, (800, 600)),             # portrait: the same rule on the other axis
    (300, 1200, 1000 / 1200, (250, 1000)),         # the longer side would be 2,400 > 1,000: capped
    (400, 666, 1.5, (600, 999)),                   # 999 <= 1000: shorter side rule
    (400, 667, 1.5, (600, 1000)),                  # 1.5 * 667 = 1000.5 rounds (half to even) to 1000: kept
    (400, 669, 1000 / 669, (598, 1000)),           # 1003.5 > 1000: the cap decides
    (600, 1000, 1.0, (600, 1000)),
    (32, 32, 600 / 32, (600, 600)),                # small images are enlarged
])
def test_scale_rule(h, w, scale, size):
    assert image_scale(h, w) == pytest.approx(scale, rel=1e-15)
    assert scaled_size(h, w, image_scale(h, w)) == size


def test_blob_is_bgr_minus_the_pixel_means():
    image = np.zeros((60, 80, 3), dtype=np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = 200, 100, 10      # R, G, B
    blob, scale = preprocess(image)
    assert blob.shape == (1, 3, 600, 800) and blob.dtype == torch.float32 and scale == 10.0
    expected = torch.tensor([10 - PIXEL_MEANS_BGR[0], 100 - PIXEL_MEANS_BGR[1], 200 - PIXEL_MEANS_BGR[2]])
    assert torch.allclose(blob[0].mean(dim=(1, 2)), expected, atol=1e-4)
    assert torch.allclose(blob[0].amax(dim=(1, 2)), blob[0].amin(dim=(1, 2)))


def test_resize_is_bilinear_without_antialias_after_the_means():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(50, 70, 3), dtype=np.uint8)
    blob, scale = preprocess(image)
    bgr = torch.from_numpy(image[:, :, ::-1].astype(np.float32)) - torch.tensor(PIXEL_MEANS_BGR)
    ref = F.interpolate(bgr.permute(2, 0, 1)[None], size=scaled_size(50, 70, scale), mode="bilinear",
                        align_corners=False)
    assert blob.shape == ref.shape == (1, 3, 600, 840)
    assert torch.equal(blob, ref)
    # Not the antialiased / area resize: a downscale differs from the antialiased one.
    big = rng.integers(0, 256, size=(1500, 900, 3), dtype=np.uint8)
    small, _ = preprocess(big)
    bgr = torch.from_numpy(big[:, :, ::-1].astype(np.float32)) - torch.tensor(PIXEL_MEANS_BGR)
    aa = F.interpolate(bgr.permute(2, 0, 1)[None], size=small.shape[2:], mode="bilinear", antialias=True)
    assert small.shape == (1, 3, 1000, 600) and not torch.allclose(small, aa, atol=1.0)


def test_preprocess_refuses_what_is_not_an_rgb_uint8_image():
    with pytest.raises(ValueError):
        preprocess(np.zeros((10, 10), dtype=np.uint8))
    with pytest.raises(ValueError):
        preprocess(np.zeros((10, 10, 3), dtype=np.float32))
