"""Box operations of the detector in plain torch: IoU, greedy NMS, per-class NMS, RoI max pooling.

They follow ``torchvision.ops`` exactly (its CPU kernels are the reference; torchvision's wheels do
not load with the CPU build of torch this project installs):

- IoU by torchvision's convention: area = (x2 - x1) * (y2 - y1), no "+ 1" as in Caffe; a box is
  suppressed when its IoU with a kept, higher-scored box is strictly above the threshold, the IoU
  (float32) compared with the threshold as a double; scores sorted stably in descending order.
- RoI pooling as ``torchvision.ops.roi_pool``: the box scaled by ``spatial_scale`` and rounded half
  away from zero to feature cells, at least 1 x 1 cell, ``inclusive`` of its end cell; bin ``p`` of
  ``n`` covers ``[floor(p * size / n), ceil((p + 1) * size / n))`` (float32) offset by the start,
  clipped to the map; the max over the bin, 0 for an empty bin.

Cross-checked against ``torchvision.ops.nms`` / ``roi_pool`` 0.28.0 (the CUDA wheel run on the CPU
in a side environment): identical keep lists and bit-identical pooled values, see
``tests/test_vision_ops.py``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """(N, 4) x1, y1, x2, y2 -> (N,) ``(x2 - x1) * (y2 - y1)``."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU matrix (N, M) of boxes ``a`` (N, 4) and ``b`` (M, 4), torchvision's convention and float order."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (box_area(a)[:, None] + box_area(b)[None, :] - inter)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float,
        max_keep: Optional[int] = None, block: int = 512) -> torch.Tensor:
    """Greedy NMS: the indices (K,) of the kept boxes in descending score, as ``torchvision.ops.nms``.

    ``boxes`` (N, 4), ``scores`` (N,). With ``max_keep`` it stops after that many (the same first
    ``max_keep`` as ``nms(...)[:max_keep]``), so the RPN's 6,000 candidates are mostly never looked
    at. Boxes are taken ``block`` at a time in score order: one IoU matrix against the boxes kept so
    far and one within the block (vectorised), then the block's sequential greedy pass on those
    precomputed rows (NumPy booleans, no tensor work per box; on a GPU one copy per block).
    """
    n = boxes.shape[0]
    device = boxes.device
    if n == 0:
        return torch.empty(0, dtype=torch.long, device=device)
    order = torch.sort(scores, descending=True, stable=True).indices
    ranked = boxes[order].float()
    limit = n if max_keep is None else min(int(max_keep), n)
    kept: list = []                                                         # positions in ``ranked``
    for start in range(0, n, block):
        part = ranked[start:start + block]
        if kept:
            prior = ranked[torch.tensor(kept, device=device)]
            suppressed = (box_iou(prior, part).double() > iou_threshold).any(dim=0)
        else:
            suppressed = torch.zeros(part.shape[0], dtype=torch.bool, device=device)
        # Row i: the boxes of the block that box i suppresses if it is kept (only later ones matter).
        over = (box_iou(part, part).double() > iou_threshold).cpu().numpy()
        alive = ~suppressed.cpu().numpy()
        for i in range(part.shape[0]):
            if alive[i]:
                kept.append(start + i)
                if len(kept) == limit:
                    break
                alive &= ~over[i]
        if len(kept) == limit:
            break
    return order[torch.tensor(kept, dtype=torch.long, device=device)]


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """(..., N) bool -> (..., ceil(N / 64)) int64: bit ``j % 64`` of word ``j // 64`` is ``mask[..., j]``."""
    n = mask.shape[-1]
    words = (n + 63) // 64
    padded = torch.zeros(mask.shape[:-1] + (words * 64,), dtype=torch.long, device=mask.device)
    padded[..., :n] = mask.long()
    shifts = torch.arange(64, device=mask.device)
    # Distinct bits: the sum is their OR (bit 63 wraps to the sign bit, as intended).
    return (padded.view(mask.shape[:-1] + (words, 64)) << shifts).sum(dim=-1)


def nms_per_class(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """NMS of the same boxes under every class's scores at once: ``kept`` (N, C) bool.

    ``boxes`` (N, 4); ``scores`` (N, C). ``kept[:, c]`` marks the boxes that
    ``torchvision.ops.nms(boxes, scores[:, c], iou_threshold)`` keeps. The IoU matrix is computed
    once (the boxes are shared) and bit-packed; the greedy suppression then advances all C classes
    together, one rank at a time: N steps, each a few operations on (C, N / 64) words, instead of
    C separate NMS calls (1,600 classes x 300 proposals: ~300 small steps).
    """
    n, c = scores.shape
    device = boxes.device
    if n == 0:
        return torch.zeros(0, c, dtype=torch.bool, device=device)
    over = pack_bits(box_iou(boxes, boxes).double() > iou_threshold)         # (N, W) rows of IoU > t
    ranked = torch.sort(scores.T.contiguous(), dim=1, descending=True, stable=True).indices.T.contiguous()  # (N, C)
    suppressed = torch.zeros(c, over.shape[1], dtype=torch.long, device=device)
    alive = torch.empty(n, c, dtype=torch.bool, device=device)             # alive[r, c]: class c's r-th box kept
    for rank in range(n):
        idx = ranked[rank]                                                  # (C,) each class's box at this rank
        word = suppressed.gather(1, (idx >> 6)[:, None]).squeeze(1)
        torch.eq((word >> (idx & 63)) & 1, 0, out=alive[rank])
        suppressed |= over.index_select(0, idx) * alive[rank, :, None]
    kept = torch.zeros(n, c, dtype=torch.bool, device=device)
    return kept.scatter_(0, ranked, alive)


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C's ``round`` of float32 values, computed in float64 so that 0.49999997 stays below 0.5."""
    x = x.double()
    return (torch.sign(x) * torch.floor(x.abs() + 0.5)).long()


def roi_pool_bins(rois: torch.Tensor, height: int, width: int, output_size: int,
                  spatial_scale: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The feature cells of every bin: ``(h_start, h_end, w_start, w_end)``, each (K, output_size) long.

    ``rois`` (K, 4) x1, y1, x2, y2 in input pixels. Bin ``[p]`` of RoI ``k`` covers rows
    ``h_start[k, p] <= h < h_end[k, p]`` (torchvision's ``roi_pool`` arithmetic, float32 bins).
    """
    scaled = rois.float() * torch.tensor(spatial_scale, dtype=torch.float32)
    cells = _round_half_away(scaled)                                        # (K, 4) x1, y1, x2, y2
    steps = torch.arange(output_size, device=rois.device, dtype=torch.float32)

    def axis(start: torch.Tensor, end: torch.Tensor, limit: int) -> Tuple[torch.Tensor, torch.Tensor]:
        size = torch.clamp(end - start + 1, min=1)
        bin_size = size.float() / float(output_size)                        # float32, as T in the kernel
        lo = torch.floor(steps[None, :] * bin_size[:, None]).long() + start[:, None]
        hi = torch.ceil((steps[None, :] + 1) * bin_size[:, None]).long() + start[:, None]
        return lo.clamp(0, limit), hi.clamp(0, limit)

    h0, h1 = axis(cells[:, 1], cells[:, 3], height)
    w0, w1 = axis(cells[:, 0], cells[:, 2], width)
    return h0, h1, w0, w1


def roi_pool_tables(features: torch.Tensor, rois: torch.Tensor, output_size: int, spatial_scale: float,
                    workspace: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """RoI max pooling as a table and an index: ``table[index]`` is ``roi_pool``'s output, channels last.

    ``features`` (N, C, H, W); ``rois`` (K, 5) batch index, x1, y1, x2, y2 (input pixels). Returns
    ``table`` (M + 1, C), whose last row is zeros (the value of an empty bin), and ``index`` (K, S, S)
    long: bin ``(ph, pw)`` of RoI ``k`` is ``table[index[k, ph, pw]]``.

    A bin is a rectangle of ``kh x kw`` cells, and bins are at most a few cells. The max of every
    ``kh x 1`` column run is built up one row at a time (``max(run of kh - 1, next row)``), then
    that of every ``kh x kw`` rectangle one column at a time, all channels-last (C contiguous); the
    table holds the rectangles of the shapes that occur, so the loops are over those shapes (a
    handful), never over RoIs. Gathering ``table[index]`` chunk by chunk (as the res5 head does)
    never materialises all K x S x S x C pooled values at once. ``workspace``: a tensor whose memory
    the table may occupy if it is large enough (reused from image to image, it saves the page faults
    of a fresh ~80 MB allocation each time).
    """
    n, c, h, w = features.shape
    k = rois.shape[0]
    s = output_size
    h0, h1, w0, w1 = roi_pool_bins(rois[:, 1:], h, w, s, spatial_scale)
    batch = rois[:, 0].long()
    top = h0[:, :, None].expand(k, s, s)
    left = w0[:, None, :].expand(k, s, s)
    kh = (h1 - h0)[:, :, None].expand(k, s, s)
    kw = (w1 - w0)[:, None, :].expand(k, s, s)
    image = batch[:, None, None].expand(k, s, s)
    nonempty = (kh > 0) & (kw > 0)
    wanted: dict = {}
    for sid in torch.unique(kh[nonempty] * (w + 1) + kw[nonempty]).tolist():
        wanted.setdefault(sid // (w + 1), []).append(sid % (w + 1))
    # All the wanted rectangle maxima go into one (M + 1, C) table, written in place.
    sizes = {(bh, bw): n * (h - bh + 1) * (w - bw + 1) for bh in wanted for bw in wanted[bh]}
    total = sum(sizes.values()) + 1
    if (workspace is not None and workspace.numel() >= total * c and workspace.dtype == features.dtype
            and workspace.device == features.device):
        table = workspace.view(-1)[:total * c].view(total, c)
    else:
        table = features.new_empty((total, c))
    table[-1] = 0                                                           # the empty bins' value
    index = torch.full((k, s, s), total - 1, dtype=torch.long, device=features.device)
    offset = 0
    nhwc = features.permute(0, 2, 3, 1).contiguous()                       # (N, H, W, C)
    column = nhwc                                                           # max of bh x 1 runs
    for bh in range(1, max(wanted, default=0) + 1):
        if bh > 1:
            column = torch.maximum(column[:, :-1], nhwc[:, bh - 1:])         # (N, H - bh + 1, W, C)
        if bh not in wanted:
            continue
        rect = column
        for bw in range(1, max(wanted[bh]) + 1):
            th, tw = h - bh + 1, w - bw + 1
            target = None
            if bw in wanted[bh]:
                target = table[offset:offset + sizes[bh, bw]].view(n, th, tw, c)
            if bw > 1 and target is not None:
                rect = torch.maximum(rect[:, :, :-1], column[:, :, bw - 1:], out=target)
            elif bw > 1:
                rect = torch.maximum(rect[:, :, :-1], column[:, :, bw - 1:])      # (N, th, tw, C)
            elif target is not None:
                target.copy_(rect)
            if target is None:
                continue
            here = (kh == bh) & (kw == bw)
            index[here] = offset + (image[here] * th + top[here]) * tw + left[here]
            offset += sizes[bh, bw]
    return table, index


def roi_pool(features: torch.Tensor, rois: torch.Tensor, output_size: int, spatial_scale: float) -> torch.Tensor:
    """RoI max pooling, ``torchvision.ops.roi_pool(features, rois, output_size, spatial_scale)``.

    ``features`` (N, C, H, W); ``rois`` (K, 5) batch index, x1, y1, x2, y2 (input pixels).
    Returns (K, C, S, S) in channels-last memory. See :func:`roi_pool_tables`.
    """
    table, index = roi_pool_tables(features, rois, output_size, spatial_scale)
    k, s = index.shape[0], output_size
    return table.index_select(0, index.reshape(-1)).view(k, s, s, table.shape[1]).permute(0, 3, 1, 2)
