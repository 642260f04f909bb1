"""The RoI head: 14x14 RoI max pooling of res4, res5 (stride 1, dilation 2), the mean, the predictors.

(R, 16w, 14, 14) pooled regions -> res5 -> (R, 32w, 14, 14) -> mean over the map -> (R, 32w) region
features (2,048 dims in the real model: the SCAN features) -> 1,601 class scores, 6,400 box
deltas and the attribute branch (class embedding of the arg-max class, a hidden layer, 401 scores).

res5 is ~5.9 GFLOP per region at full width, ~98 % of the detector's arithmetic: regions go through
it in chunks (all of an image's, or several images', regions batched; ``chunk`` regions at a time to
keep the activations in cache and the memory bounded) in channels-last layout, which the CPU
(oneDNN) and GPU (cuDNN) convolutions run fastest, with the batch norms folded into the
convolutions.
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from . import spec
from .resnet import make_stage


class BoxPredictor(nn.Module):
    """Fast R-CNN outputs of the VG model: class scores, class-specific box deltas, attribute scores."""

    def __init__(self, channels: int, num_classes: int = spec.NUM_OBJECT_CLASSES,
                 num_attributes: int = spec.NUM_ATTRIBUTE_CLASSES) -> None:
        super().__init__()
        embed = channels // spec.ATTR_EMBED_DIVISOR
        hidden = channels // spec.ATTR_HIDDEN_DIVISOR
        self.cls_score = nn.Linear(channels, num_classes + 1)
        self.bbox_pred = nn.Linear(channels, num_classes * 4)
        self.cls_embedding = nn.Embedding(num_classes + 1, embed)
        self.fc_attr = nn.Linear(channels + embed, hidden)
        self.attr_score = nn.Linear(hidden, num_attributes + 1)

    def forward(self, pooled: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``pooled`` (R, D) -> class scores (R, 1601), box deltas (R, 6400), attribute scores (R, 401)."""
        scores = self.cls_score(pooled)
        deltas = self.bbox_pred(pooled)
        embedding = self.cls_embedding(scores.argmax(dim=-1))
        hidden = torch.relu(self.fc_attr(torch.cat([pooled, embedding], dim=-1)))
        return {"class_scores": scores, "box_deltas": deltas, "attribute_scores": self.attr_score(hidden)}


class RoIHeads(nn.Module):
    """res5 over pooled regions and the predictors (the port's ``roi_heads``: ``res5.*``, ``box_predictor.*``)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.res5 = make_stage("res5", spec.STAGE_OUT_PER_WIDTH["res4"] * width, width)
        self.box_predictor = BoxPredictor(spec.STAGE_OUT_PER_WIDTH["res5"] * width)

    def region_features(self, regions: torch.Tensor, chunk: int = 32) -> torch.Tensor:
        """(R, 16w, 14, 14) pooled res4 regions -> (R, 32w) res5 features averaged over the 14x14 map.

        Computed ``chunk`` regions at a time, channels-last; returned in the regions' dtype.
        """
        out = regions.new_empty((regions.shape[0], self.res5[-1].conv3.weight.shape[0]))
        for start in range(0, regions.shape[0], chunk):
            x = regions[start:start + chunk].contiguous(memory_format=torch.channels_last)
            out[start:start + chunk] = self.res5(x).mean(dim=(2, 3))
        return out

    def forward(self, pooled: torch.Tensor) -> Dict[str, torch.Tensor]:
        return self.box_predictor(pooled)


def class_probabilities(class_scores: torch.Tensor) -> torch.Tensor:
    """(R, 1601) scores -> float32 softmax over background + 1,600 classes."""
    return F.softmax(class_scores.float(), dim=-1)
