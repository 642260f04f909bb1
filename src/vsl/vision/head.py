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

    def forward(self, pooled: torch.Tensor, box_deltas: bool = True) -> Dict[str, torch.Tensor]:
        """``pooled`` (R, D) -> class scores (R, 1601), attribute scores (R, 401) and, with ``box_deltas``,
        box deltas (R, 6400) (four fifths of this layer's work; region features never need them)."""
        scores = self.cls_score(pooled)
        embedding = self.cls_embedding(scores.argmax(dim=-1))
        hidden = torch.relu(self.fc_attr(torch.cat([pooled, embedding], dim=-1)))
        out = {"class_scores": scores, "attribute_scores": self.attr_score(hidden)}
        if box_deltas:
            out["box_deltas"] = self.bbox_pred(pooled)
        return out


class RoIHeads(nn.Module):
    """res5 over pooled regions and the predictors (the port's ``roi_heads``: ``res5.*``, ``box_predictor.*``)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.res5 = make_stage("res5", spec.STAGE_OUT_PER_WIDTH["res4"] * width, width)
        self.box_predictor = BoxPredictor(spec.STAGE_OUT_PER_WIDTH["res5"] * width)

    def region_features(self, regions: torch.Tensor, chunk: int = 16) -> torch.Tensor:
        """(R, 16w, 14, 14) pooled res4 regions -> (R, 32w) res5 features averaged over the 14x14 map."""
        r, c, h, w = regions.shape
        table = regions.permute(0, 2, 3, 1).reshape(-1, c)
        index = torch.arange(r * h * w, device=regions.device).view(r, h, w)
        return self.pooled_features(table, index, chunk)

    def pooled_features(self, table: torch.Tensor, index: torch.Tensor, chunk: int = 16) -> torch.Tensor:
        """res5 features (R, 32w) of RoI-pooled regions given as ``table[index]`` (see ``roi_pool_tables``).

        ``table`` (M, 16w); ``index`` (R, 14, 14). Computed ``chunk`` regions at a time (gathered
        from the table just before use, so they are in cache), channels-last, in the table's dtype.
        res5's 3x3 convolutions have dilation 2: each region's 14x14 map is gathered as its 2 x 2
        interleaved 7x7 sub-grids (cells ``(2p + a, 2q + b)``), on which they are plain 3x3
        convolutions (dilation 1, padding 1: the zero padding falls on the same cells, as 2 divides
        14); ~1.4x faster on a CPU than the dilated ones and bit-identical in float32 here. The mean
        over the map is the mean over the sub-grids, so they are never put back together.
        """
        r, h, w = index.shape
        c = table.shape[1]
        split = spec.DILATION["res5"]
        if h % split or w % split:
            split = 1
        # (R, 14, 14) -> (R, a, b, 7, 7): sub-grid (a, b) holds the cells (2p + a, 2q + b).
        grids = index.view(r, h // split, split, w // split, split).permute(0, 2, 4, 1, 3)
        out = table.new_empty((r, self.res5[-1].conv3.weight.shape[0]))
        for start in range(0, r, chunk):
            part = grids[start:start + chunk]
            n = part.shape[0]
            x = table.index_select(0, part.reshape(-1)).view(n * split * split, h // split, w // split, c)
            x = x.permute(0, 3, 1, 2)                                       # channels-last (N', C, 7, 7)
            for block in self.res5:
                x = block(x, split)
            out[start:start + n] = x.mean(dim=(2, 3)).view(n, split * split, -1).mean(dim=1)
        return out

    def forward(self, pooled: torch.Tensor, box_deltas: bool = True) -> Dict[str, torch.Tensor]:
        return self.box_predictor(pooled, box_deltas)


def class_probabilities(class_scores: torch.Tensor) -> torch.Tensor:
    """(R, 1601) scores -> float32 softmax over background + 1,600 classes."""
    return F.softmax(class_scores.float(), dim=-1)
