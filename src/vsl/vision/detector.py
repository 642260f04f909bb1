"""The BUTD detector as one module: from RGB images to region features, boxes and classes.

:class:`Detector` holds the port's three parts under its key names (``backbone``,
``proposal_generator``, ``roi_heads``); :func:`load_detector` builds it at the width stored in a
weights file and loads it. Images go one at a time through the backbone and the RPN (their sizes
differ and the reference never pads them), their 300 proposals through the res5 head in chunks.
:meth:`Detector.detect` returns every intermediate (for tests and benchmarks),
:meth:`Detector.extract` the :class:`Regions` that ``vsl extract`` writes.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from . import spec
from .head import RoIHeads, class_probabilities
from .ops import roi_pool_tables
from .preprocess import preprocess
from .resnet import Backbone, ConvNorm
from .rpn import RegionProposalNetwork
from .selection import BoxSelection, select
from .weights import check_layout, read_state_dict, width_of


@dataclass
class Regions:
    """The regions kept for one image (n = 36 in the fixed layout, fewer only if it has fewer proposals).

    ``features`` (n, D) float32 res5 features; ``boxes`` (n, 4) float32 x1, y1, x2, y2 in the
    original image's pixels; ``image_size`` (h, w) of the original image; ``confidences`` (n,)
    float32 (see :func:`vsl.vision.selection.max_confidence`); ``object_ids`` (n,) long, the
    arg-max object class (1 ... 1600; 0 is background).
    """

    features: torch.Tensor
    boxes: torch.Tensor
    image_size: Tuple[int, int]
    confidences: torch.Tensor
    object_ids: torch.Tensor


@dataclass
class Detection:
    """Everything the detector computes for one image (tensors on the detector's device).

    ``blob_shape`` (1, 3, H', W') of the network input; ``scale`` H' / H; ``proposals`` (R, 4) in input
    pixels (R <= 300) with ``proposal_logits`` (R,); ``pooled`` (R, D) region features;
    ``class_probs`` (R, 1601) float32; ``box_deltas`` (R, 6400); ``attribute_scores`` (R, 401).
    """

    blob_shape: Tuple[int, int, int, int]
    scale: float
    image_size: Tuple[int, int]
    proposals: torch.Tensor
    proposal_logits: torch.Tensor
    pooled: torch.Tensor
    class_probs: torch.Tensor
    box_deltas: Optional[torch.Tensor]
    attribute_scores: torch.Tensor


class Detector(nn.Module):
    """ResNet-101 C4 Faster R-CNN of bottom-up attention at stem width ``width`` (64 for the real model).

    One detector serves one thread at a time: it keeps the RoI-pooling table's memory between
    images (``_workspace``, ~80 MB at full width) so that each image does not page in a fresh one.
    """

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.width = width
        res4 = spec.STAGE_OUT_PER_WIDTH["res4"] * width
        self.backbone = Backbone(width)
        self.proposal_generator = RegionProposalNetwork(res4, spec.RPN_HIDDEN_PER_WIDTH * width)
        self.roi_heads = RoIHeads(width)
        #: Regions per res5 pass: 16 keeps each activation under glibc's 32 MB mmap threshold on a
        #: CPU (larger ones are fresh pages at every call: measured slower); a GPU takes them all.
        self.head_chunk = 16
        self._workspace: Optional[torch.Tensor] = None

    @property
    def feature_dim(self) -> int:
        """D of the region features: 2,048 for the real weights (32 x the width)."""
        return spec.STAGE_OUT_PER_WIDTH["res5"] * self.width

    @property
    def dtype(self) -> torch.dtype:
        return self.backbone.stem.conv1.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.backbone.stem.conv1.weight.device

    def fold_batch_norms(self, fold: bool = True) -> "Detector":
        """Fold (or unfold) every frozen batch norm into its convolution; the state dict is unchanged."""
        for module in self.modules():
            if isinstance(module, ConvNorm):
                module.fold() if fold else module.unfold()
        return self

    @torch.no_grad()
    def detect(self, image: np.ndarray, box_deltas: bool = True) -> Detection:
        """All the outputs for one (H, W, 3) uint8 RGB image (see :class:`Detection`).

        ``box_deltas=False`` skips the class-specific box regression (``box_deltas`` is then None):
        the regions keep the proposal boxes, as ``generate_tsv.py``.
        """
        blob, scale = preprocess(image, self.device)
        # Channels-last: ~1.4x faster convolutions on a CPU (oneDNN), and what cuDNN prefers.
        blob = blob.to(self.dtype).contiguous(memory_format=torch.channels_last)
        features = self.backbone(blob)                                          # (1, 16w, H/16, W/16)
        input_size = (int(blob.shape[2]), int(blob.shape[3]))
        proposals, logits = self.proposal_generator(features, input_size)
        rois = torch.cat([proposals.new_zeros((proposals.shape[0], 1)), proposals], dim=1)
        table, index = roi_pool_tables(features, rois, spec.POOLED_SIZE, spec.POOL_SCALE, self._workspace)
        if self._workspace is None or table.data_ptr() != self._workspace.data_ptr():
            self._workspace = table                                          # reused by the next image
        del features
        pooled = self.roi_heads.pooled_features(table, index, self.head_chunk)
        del table
        outputs = self.roi_heads(pooled, box_deltas)
        return Detection(tuple(blob.shape), scale, (int(image.shape[0]), int(image.shape[1])), proposals, logits,
                         pooled.float(), class_probabilities(outputs["class_scores"]),
                         outputs["box_deltas"].float() if box_deltas else None,
                         outputs["attribute_scores"].float())

    @torch.no_grad()
    def extract(self, images: Sequence[np.ndarray], selection: BoxSelection = BoxSelection()) -> List[Regions]:
        """The :class:`Regions` of every (H, W, 3) uint8 RGB image, by ``generate_tsv.py``'s selection."""
        out = []
        for image in images:
            found = self.detect(image, box_deltas=False)
            keep, conf = select(found.proposals, found.class_probs, selection)
            ids = found.class_probs[keep, 1:].argmax(dim=1) + 1
            out.append(Regions(features=found.pooled[keep].cpu(), boxes=(found.proposals[keep] / found.scale).cpu(),
                               image_size=found.image_size, confidences=conf[keep].float().cpu(),
                               object_ids=ids.cpu()))
        return out


def expected_layout(width: int) -> Dict[str, Tuple[int, ...]]:
    """Every state-dict key of the detector at ``width`` with its shape (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = Detector(width)
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def load_detector(path: Union[str, Path], device: Union[str, torch.device] = "cpu",
                  dtype: torch.dtype = torch.float32, fold_batch_norms: bool = True) -> Detector:
    """The detector with the weights of ``path`` (the port's state dict, any width), ready for inference.

    ``dtype`` float32, float16 or bfloat16 (weights and activations; boxes, softmax and selection
    stay float32). For TF32 on a GPU run it under ``vsl.precision.precision_context("tf32", device)``.
    A file of another architecture raises :class:`~vsl.vision.weights.DetectorError`.
    """
    state = read_state_dict(path)
    width = width_of(state)
    check_layout(path, expected_layout(width), state)
    model = Detector(width)
    model.load_state_dict(state, strict=True)
    model.eval().requires_grad_(False).to(device=torch.device(device), dtype=dtype)
    # The anchors stay float32 in every dtype (bfloat16 would move a 45.25 px anchor corner by 0.005 px).
    anchors = model.proposal_generator.anchor_generator.cell_anchors[0]
    anchors.data = state["proposal_generator.anchor_generator.cell_anchors.0"].to(anchors.device, torch.float32)
    if fold_batch_norms:
        model.fold_batch_norms()
    if model.device.type != "cpu":
        model.head_chunk = spec.RPN_POST_NMS_TOP_N
    return model
