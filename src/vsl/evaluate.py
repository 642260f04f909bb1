"""Evaluation: encode a split once, score every image against every caption, apply a protocol.

* :func:`encode_split` runs the image encoder over the split's distinct images (not once per
  caption, as the published ``encode_data`` does) and the text encoder over its captions.
* :func:`score` scores all pairs in blocks of images (:func:`vsl.distributed.sharded_similarity`),
  with a progress bar over pairs; under torchrun the blocks are split over the processes, and the
  score matrix is bit-for-bit the same for any number of processes.
* :func:`evaluate` is what ``vsl eval`` runs: one checkpoint, or two for the SGRAF ensemble (the
  mean of the two models' score matrices, each model with its own embeddings and vocabulary).

Protocols: ``coco1k`` = the mean over 5 folds of 1,000 images / 5,000 captions (only the 5 diagonal
blocks are scored unless the full matrix is asked for); ``coco5k`` / ``full`` = all images.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from . import metrics
from .checkpoint import load_state, read_checkpoint
from .config import Config
from .distributed import DistInfo, image_shard, resolve_device, sharded_similarity
from .data import check_finite
from .errors import CheckpointError, ConfigError
from .fileio import atomic_write, check_writable
from .logs import progress_bar
from .model import VSLModel, build_model
from .precision import precision_context

PathLike = Union[str, os.PathLike]
PROTOCOLS = ("coco1k", "coco5k", "full")
SPLITS = ("train", "dev", "test", "testall")
FOLD_IMAGES = 1000
NUM_FOLDS = 5


# --------------------------------------------------------------------------------------------
# Encoding and scoring
# --------------------------------------------------------------------------------------------
@dataclass
class Embeddings:
    """A split encoded by one model.

    images: ``(n, R, d)``; captions: ``(m, L, d)`` zero-padded; lengths: ``(m,)`` int64 (CPU).
    """

    images: torch.Tensor
    captions: torch.Tensor
    lengths: torch.Tensor

    def subset(self, image_slice: slice, caption_slice: slice) -> "Embeddings":
        lengths = self.lengths[caption_slice]
        max_len = int(lengths.max()) if lengths.numel() else 1
        return Embeddings(self.images[image_slice], self.captions[caption_slice, :max_len], lengths)


def pad_token_ids(token_ids: Sequence[Sequence[int]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Zero-padded ``(m, L)`` int64 ids and ``(m,)`` lengths of a list of id lists."""
    lengths = torch.tensor([len(t) for t in token_ids], dtype=torch.int64)
    if (lengths == 0).any():
        raise ValueError("empty token list")
    flat = torch.tensor([i for t in token_ids for i in t], dtype=torch.int64)
    ids = torch.zeros(len(token_ids), int(lengths.max()), dtype=torch.int64)
    ids[torch.arange(ids.size(1)) < lengths.unsqueeze(1)] = flat     # row-major fill = caption order
    return ids, lengths


@torch.inference_mode()
def encode_split(model: VSLModel, images: np.ndarray, token_ids: Sequence[Sequence[int]], *,
                 batch_size: int = 128, progress: bool = True, precision: str = "fp32",
                 desc: str = "encode", source: str = "image features") -> Embeddings:
    """Encode ``images`` ``(n, R, D)`` (a memmap is read batch by batch) and captions (lists of ids).

    ``source`` names the features in errors (non-finite values are a :class:`DataError`).

    Returns :class:`Embeddings` on the model's device, in the order given.
    """
    device = model.device
    ids, lengths = pad_token_ids(token_ids)
    n, m = len(images), len(token_ids)
    bar = progress_bar(n + m, desc, enabled=progress, unit="item", unit_scale=True)
    with precision_context(precision, device):
        img_parts = []
        for i in range(0, n, batch_size):
            # A copy: memmaps are read-only, and only this batch is read from disk.
            array = np.array(images[i:i + batch_size], dtype=np.float32)
            check_finite(array, source, i)
            batch = torch.from_numpy(array)
            img_parts.append(model.encode_images(batch.to(device)).float())
            bar.update(len(batch))
        cap_emb = None
        for j in range(0, m, batch_size):
            lens = lengths[j:j + batch_size]
            emb = model.encode_captions(ids[j:j + batch_size, :int(lens.max())].to(device), lens).float()
            if cap_emb is None:
                cap_emb = emb.new_zeros(m, ids.size(1), emb.size(-1))
            cap_emb[j:j + len(lens), :emb.size(1)] = emb
            bar.update(len(lens))
    bar.close()
    img_emb = torch.cat(img_parts) if img_parts else torch.zeros(0, device=device)
    return Embeddings(img_emb, cap_emb, lengths)


@torch.inference_mode()
def score(model: VSLModel, emb: Embeddings, *, bar=None, precision: str = "fp32", group=None) -> torch.Tensor:
    """All-pairs scores ``(n, m)`` float32 on the CPU; ``bar`` (a tqdm) advances by pairs scored.

    ``group``: the process group of a torchrun run (:attr:`vsl.distributed.DistInfo.group`): each
    process scores its share of the images and every process gets the whole matrix. ``None``: this
    process scores everything, in the same image blocks (so the result is identical).
    """
    progress = bar.update if bar is not None else None
    with precision_context(precision, model.device):
        sims = sharded_similarity(model, emb.images, emb.captions, emb.lengths.to(model.device),
                                  progress=progress, group=group)
    return sims.float().cpu()


def fold_slices(protocol: str, num_images: int, captions_per_image: int,
                full_matrix: bool = False) -> List[Tuple[slice, slice]]:
    """The (image, caption) blocks a protocol needs: 5 diagonal blocks for ``coco1k``, else one."""
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}")
    if protocol == "coco1k":
        if num_images != NUM_FOLDS * FOLD_IMAGES:
            raise ConfigError(f"protocol coco1k needs a split of {NUM_FOLDS * FOLD_IMAGES} images "
                              f"(COCO testall), this one has {num_images}; use --protocol full")
        if not full_matrix:
            k = captions_per_image
            return [(slice(f * FOLD_IMAGES, (f + 1) * FOLD_IMAGES),
                     slice(f * FOLD_IMAGES * k, (f + 1) * FOLD_IMAGES * k)) for f in range(NUM_FOLDS)]
    return [(slice(0, num_images), slice(0, num_images * captions_per_image))]


def protocol_result(blocks: List[np.ndarray], protocol: str, captions_per_image: int) -> Dict:
    """Protocol metrics from the scored blocks of :func:`fold_slices`."""
    if len(blocks) == 1:
        return metrics.evaluate_protocol(blocks[0], protocol, captions_per_image=captions_per_image)
    return mean_over_folds([metrics.retrieval_metrics(b, captions_per_image=captions_per_image) for b in blocks])


def mean_over_folds(folds: List[Dict]) -> Dict:
    """The published 1K summary: every metric (R@K, medr, meanr, rsum) averaged over the folds."""
    out: Dict = {d: {k: float(np.mean([f[d][k] for f in folds])) for k in folds[0][d]} for d in ("i2t", "t2i")}
    out["rsum"] = float(np.mean([f["rsum"] for f in folds]))
    out["folds"] = folds
    return out


# --------------------------------------------------------------------------------------------
# Checkpoints -> models
# --------------------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    path: Path
    model: VSLModel
    config: Config
    vocab: object


def load_for_eval(path: PathLike, device: torch.device, vocab_path: Optional[PathLike] = None,
                  data_name: Optional[str] = None, **overrides) -> LoadedModel:
    """A checkpoint (published or vsl format) as an eval-mode model plus its vocabulary.

    The vocabulary is ``{vocab_path}/{data_name}_vocab.json``, both taken from the checkpoint's
    options unless given (published checkpoints hold no vocabulary). ``overrides`` replace options
    that do not change the weights (``precision``, ``score_chunk``); None values are ignored.
    """
    from .vocab import Vocabulary, vocab_file

    path = Path(path)
    ckpt = read_checkpoint(path)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if data_name is not None:
        overrides["data_name"] = data_name
    if vocab_path is not None:
        overrides["vocab_path"] = str(vocab_path)
    config = ckpt["config"].replace(**overrides)
    vocab = Vocabulary.from_json(vocab_file(config.vocab_path, config.data_name))
    model = build_model(config)
    load_state(model, ckpt["model"], path)
    return LoadedModel(path, model.to(device).eval(), config, vocab)


def check_fits(loaded: LoadedModel, dataset) -> None:
    """One-line CheckpointError when the checkpoint does not fit the data (vocab, img_dim, regions)."""
    from .data import check_compatible

    check_compatible(loaded.config, dataset, loaded.vocab, str(loaded.path))
    if dataset.num_regions != loaded.config.num_regions:
        raise CheckpointError(f"{loaded.path}: the model expects {loaded.config.num_regions} regions per image, "
                              f"the data has {dataset.num_regions}")


# --------------------------------------------------------------------------------------------
# vsl eval
# --------------------------------------------------------------------------------------------
def evaluate(checkpoints: Sequence[PathLike], data_path: Optional[PathLike] = None, split: str = "test",
             protocol: str = "full", *, vocab_path: Optional[PathLike] = None, data_name: Optional[str] = None,
             device: str = "auto", batch_size: int = 128, output: Optional[PathLike] = None,
             save_sims: Optional[PathLike] = None, progress: bool = True,
             distributed: Optional[DistInfo] = None, precision: Optional[str] = None,
             score_chunk: Optional[int] = None) -> Dict:
    """Evaluate one checkpoint, or the ensemble of two (mean of their score matrices).

    ``data_path``, ``vocab_path`` and ``data_name`` default to the (first) checkpoint's options.
    ``distributed`` (a torchrun process): the images are split over the processes for scoring,
    every process returns the result, only the main one shows progress and writes files.
    ``precision`` (fp32/tf32/bf16) and ``score_chunk`` override the checkpoints' options.

    Returns ``{"i2t": {r1, r5, r10, medr, meanr}, "t2i": {...}, "rsum", ["folds": [...]],
    "protocol", "split", "checkpoints", "images", "captions"}`` and optionally writes it as JSON
    (``output``) and the ``(images, captions)`` float32 score matrix as ``.npy`` (``save_sims``).
    """
    from .data import PrecompDataset

    if not 1 <= len(checkpoints) <= 2:
        raise ConfigError(f"give one checkpoint, or two for the ensemble; got {len(checkpoints)}")
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    dist_info = distributed or DistInfo()
    for target in (output, save_sims):   # fail before the scoring, not after it
        if target is not None and dist_info.is_main:
            check_writable(target, "file")
    dev = dist_info.device if distributed is not None else resolve_device(device)
    progress = progress and dist_info.is_main
    loaded = [load_for_eval(p, dev, vocab_path, data_name, precision=precision, score_chunk=score_chunk)
              for p in checkpoints]
    names = {m.config.data_name for m in loaded}
    if len(names) > 1:
        raise ConfigError(f"the checkpoints were trained on different datasets ({', '.join(sorted(names))}); "
                          "pass --data_name")
    data_path = data_path if data_path is not None else loaded[0].config.data_path
    dataset = PrecompDataset(data_path, loaded[0].config.data_name, split, loaded[0].vocab)
    for m in loaded:
        check_fits(m, dataset)
    cpi = dataset.captions_per_image
    num_images = dataset.num_images
    blocks = fold_slices(protocol, num_images, cpi, full_matrix=save_sims is not None)

    # This process's share of the pairs (all of them in a single process).
    pairs_per_model = sum(_shard_size(s.stop - s.start, dist_info) * (c.stop - c.start) for s, c in blocks)
    sums: List[Optional[torch.Tensor]] = [None] * len(blocks)
    for m in loaded:
        tokens = [m.vocab.encode(c) for c in dataset.captions]
        emb = encode_split(m.model, dataset.images[:num_images], tokens, batch_size=batch_size,
                           source=str(dataset.images_path),
                           progress=progress, precision=m.config.precision, desc=f"encode {m.path.name}")
        bar = progress_bar(pairs_per_model, f"score {m.path.name}", enabled=progress, unit="pair", unit_scale=True)
        for b, (img_s, cap_s) in enumerate(blocks):
            sims = score(m.model, emb.subset(img_s, cap_s), bar=bar, precision=m.config.precision,
                         group=dist_info.group)
            sums[b] = sims if sums[b] is None else sums[b] + sims
        bar.close()
        del emb
    # Ensemble = mean of the models' scores (for one model, the scores themselves).
    scores = [(s / len(loaded)).numpy() for s in sums]
    result = protocol_result(scores, protocol, cpi)
    result.update(protocol=protocol, split=split, checkpoints=[str(m.path) for m in loaded],
                  images=num_images, captions=num_images * cpi)
    if save_sims is not None and dist_info.is_main:
        write_npy(save_sims, scores[0].astype(np.float32))
    if output is not None and dist_info.is_main:
        write_json(output, result)
    return result


def _shard_size(num_images: int, dist_info: DistInfo) -> int:
    start, stop = image_shard(num_images, dist_info.rank, dist_info.world_size)
    return stop - start


# --------------------------------------------------------------------------------------------
# Atomic writers
# --------------------------------------------------------------------------------------------
def write_json(path: PathLike, obj) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    return atomic_write(path, lambda fh: fh.write((json.dumps(obj, indent=2) + "\n").encode()))


def write_npy(path: PathLike, array: np.ndarray) -> Path:
    """Write ``array`` as ``.npy`` at exactly ``path``, atomically."""
    return atomic_write(path, lambda fh: np.save(fh, array))
