"""``vsl fit-shortlist``: train only the shortlist head of a frozen checkpoint (the published ones included).

The encoders are frozen, so each training image and caption is encoded once and kept in memory as
float16 (:class:`FrozenEmbeddings`): every region embedding of an image and every word embedding of
a caption, which the head's element-wise layer reads, or only their means for the linear head
(``shortlist_hidden = 0``, whose first step is the mean). The head's epochs run over those tensors,
in minutes on a CPU. A training split too large for ``max_memory_gb`` is fitted on a seeded random
subset of its images (said once). The output checkpoint holds the original weights unchanged plus
the head, so its exact scores and its ``vsl eval`` table are those of the input checkpoint.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..checkpoint import load_state, read_checkpoint, save_checkpoint
from ..config import SHORTLIST_DIM, SHORTLIST_LOSSES
from ..data import split_files
from ..device import resolve_device
from ..errors import ConfigError
from ..fileio import check_writable
from ..logs import progress_bar
from ..metrics import REPORT_KS, shortlist_recall
from ..models import build_model
from ..models.shortlist import ShortlistHead, masked_mean, shortlist_loss
from ..runtime import LoadedModel, caption_batches, image_batches, load_for_use, pad_token_ids, padded_words
from .fusion import FUSION_K, check_split, choose_fusion

PathLike = Union[str, os.PathLike]
#: Bytes of one stored embedding value (float16).
_BYTES = 2
#: Default memory for the frozen training embeddings of ``vsl fit-shortlist``.
MAX_MEMORY_GB = 4.0


@dataclass
class FrozenEmbeddings:
    """A training split encoded once by frozen encoders, for fitting the head.

    images: ``(n, E, d)`` float16, E = regions per image, or 1 when pooled (their mean);
    words: ``(W, d)`` float16, the captions' word embeddings packed one caption after another (or
    one mean per caption when pooled); offsets, lengths: ``(m,)`` int64, each caption's first row in
    ``words`` and its number of rows; image_of: ``(m,)`` int64, the row of its image in ``images``.
    """

    images: torch.Tensor
    words: torch.Tensor
    offsets: torch.Tensor
    lengths: torch.Tensor
    image_of: torch.Tensor

    @property
    def num_captions(self) -> int:
        return int(self.lengths.numel())

    def captions(self, idx: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Captions ``idx (B,)`` as zero-padded ``(B, L, d)`` float32 and their ``(B,)`` lengths."""
        lengths = self.lengths[idx]
        return padded_words(self.words, self.offsets[idx].numpy(), lengths.numpy()), lengths


def _fitting_images(per_image: np.ndarray, max_bytes: float, seed: int) -> np.ndarray:
    """Sorted indices of the images whose embeddings (``per_image`` bytes each) fit in ``max_bytes``:
    all of them, or the longest prefix of a seeded random permutation that fits."""
    if per_image.sum() <= max_bytes:
        return np.arange(len(per_image))
    order = np.random.default_rng(seed).permutation(len(per_image))
    fits = int(np.searchsorted(np.cumsum(per_image[order]), max_bytes, side="right"))
    return np.sort(order[:max(1, fits)])


@torch.inference_mode()
def frozen_embeddings(model, images: np.ndarray, token_ids: Sequence[Sequence[int]], captions_per_image: int, *,
                      pooled: bool, max_memory_gb: float = MAX_MEMORY_GB, seed: int = 0, batch_size: int = 256,
                      progress: bool = True, source: str = "image features",
                      desc: str = "encode") -> Tuple[FrozenEmbeddings, int]:
    """Encode ``images`` ``(n, R, img_dim)`` and their captions once: ``(FrozenEmbeddings, images kept)``.

    ``pooled`` keeps only the means (the linear head). When all embeddings would take more than
    ``max_memory_gb``, a seeded random subset of the images (with their captions) is kept.
    """
    device = model.device
    ids, lengths = pad_token_ids(token_ids)
    n, (r, d) = len(images), (images.shape[1], model.config.embed_size)
    rows_per_image = (1 + captions_per_image) if pooled else r + lengths.view(-1, captions_per_image).sum(1).numpy()
    keep = _fitting_images(np.broadcast_to(rows_per_image * d * _BYTES, (n,)), max_memory_gb * 2 ** 30, seed)
    caps = torch.from_numpy((keep[:, None] * captions_per_image + np.arange(captions_per_image)).reshape(-1))
    ids, lengths = ids[caps], lengths[caps]
    stored = torch.ones_like(lengths) if pooled else lengths
    offsets = torch.cumsum(stored, 0) - stored
    img_store = torch.empty(len(keep), 1 if pooled else r, d, dtype=torch.float16)
    word_store = torch.empty(int(stored.sum()), d, dtype=torch.float16)
    bar = progress_bar(len(keep) + len(caps), desc, enabled=progress, unit="item", unit_scale=True)
    for i, j, emb in image_batches(model, images, rows=keep, batch_size=batch_size, source=source, bar=bar):
        img_store[i:j] = (emb.mean(dim=1, keepdim=True) if pooled else emb).cpu().half()     # emb (b, R, d)
    for j, _, words, lens in caption_batches(model, ids, lengths, batch_size=batch_size, bar=bar):
        if pooled:
            packed = masked_mean(words, lens.to(device))                               # (b, d)
        else:
            packed = words[torch.arange(words.size(1), device=device) < lens.to(device).unsqueeze(1)]
        start = int(offsets[j])
        word_store[start:start + len(packed)] = packed.cpu().half()
    bar.close()
    image_of = torch.arange(len(keep)).repeat_interleave(captions_per_image)
    return FrozenEmbeddings(img_store, word_store, offsets, stored, image_of), len(keep)


def train_head(head: ShortlistHead, data: FrozenEmbeddings, *, epochs: int, batch_size: int, learning_rate: float,
               loss: str, temperature: float, seed: int = 0, device: torch.device = torch.device("cpu"),
               progress: bool = True) -> list:
    """Adam on the head over all captions per epoch (each with its image); returns the mean loss per epoch."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(head.parameters(), lr=learning_rate)
    m = data.num_captions
    steps = -(-m // batch_size)
    # Cosine decay to zero over the run: the last epochs settle instead of oscillating.
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs * steps))
    history = []
    bar = progress_bar(epochs * steps, "fit shortlist", enabled=progress, unit="step")
    head.train()
    for epoch in range(epochs):
        order = torch.randperm(m, generator=generator)
        total = 0.0
        for s in range(steps):
            idx = order[s * batch_size:(s + 1) * batch_size]
            image_ids = data.image_of[idx]
            words, lengths = data.captions(idx)
            value = shortlist_loss(head.images(data.images[image_ids].float().to(device)),
                                   head.captions(words.to(device), lengths.to(device)),
                                   image_ids.to(device), loss=loss, temperature=temperature)
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
            schedule.step()
            total += float(value.detach())
            bar.update(1)
        history.append(total / steps)
        bar.set_postfix(epoch=epoch + 1, loss=f"{history[-1]:.4g}", refresh=False)
    bar.close()
    head.eval()
    return history


@torch.inference_mode()
def global_vectors(model, head: ShortlistHead, images: np.ndarray, token_ids: Sequence[Sequence[int]], *,
                   batch_size: int = 256, progress: bool = True, source: str = "image features",
                   desc: str = "encode") -> Tuple[torch.Tensor, torch.Tensor]:
    """The head's vectors of ``images`` ``(n, R, img_dim)`` and captions: ``(n, D)``, ``(m, D)`` float32 (CPU)."""
    device = model.device
    ids, lengths = pad_token_ids(token_ids)
    bar = progress_bar(len(images) + len(lengths), desc, enabled=progress, unit="item", unit_scale=True)
    img_parts = [head.images(emb).float().cpu()
                 for _, _, emb in image_batches(model, images, batch_size=batch_size, source=source, bar=bar)]
    cap_parts = [head.captions(words, lens.to(device)).float().cpu()
                 for _, _, words, lens in caption_batches(model, ids, lengths, batch_size=batch_size, bar=bar)]
    bar.close()
    return torch.cat(img_parts), torch.cat(cap_parts)


def fit_shortlist(checkpoint: PathLike, data_path: Optional[PathLike] = None, out: PathLike = "shortlist.pth.tar", *,
                  vocab_path: Optional[PathLike] = None, data_name: Optional[str] = None, device: str = "auto",
                  dim: Optional[int] = None, hidden: Optional[int] = None, loss: Optional[str] = None,
                  epochs: Optional[int] = None, batch_size: Optional[int] = None,
                  learning_rate: Optional[float] = None, temperature: Optional[float] = None, seed: int = 0,
                  eval_split: Optional[str] = "dev", max_memory_gb: float = MAX_MEMORY_GB,
                  fit_fusion: bool = False, keep_head: bool = False, fusion_k: int = FUSION_K,
                  progress: bool = True) -> Dict[str, Any]:
    """Fit a shortlist head on the training split of a frozen ``checkpoint`` and write ``out``.

    Options left ``None`` come from the checkpoint's configuration (``shortlist_dim`` falls back to
    :data:`vsl.config.SHORTLIST_DIM` when the checkpoint has no head; ``hidden`` to the checkpoint's
    ``shortlist_hidden``). The head's shortlist recall at K = 10/50/100/200 on ``eval_split`` (if the
    data has it) is returned and stored in the checkpoint. The frozen training embeddings are kept in
    at most ``max_memory_gb`` (a random subset of the training images beyond that, said on stderr).

    ``fit_fusion``: then choose the fusion weight lambda of two-stage scores on ``eval_split``
    (:func:`vsl.retrieval.fusion.choose_fusion`, shortlists of ``fusion_k``) and store it with the
    head (``Config.shortlist_fusion``); otherwise a new head gets lambda 0 (a weight chosen for
    another head does not carry over). ``keep_head`` (with ``fit_fusion``): keep the checkpoint's
    head, train nothing, only choose lambda.

    Returns ``{"out", "seconds", "encode_seconds", "loss_history", "recall": {"i2t": {...}, "t2i": {...}},
    "train_images", "config": {shortlist fields}, "fusion": choose_fusion's summary or None}``.
    """
    start = time.time()
    out = Path(out)
    check_writable(out, "file")
    if keep_head and not fit_fusion:
        raise ConfigError("--keep_head keeps the checkpoint's shortlist head and only chooses the fusion weight: "
                          "give --fit_fusion with it")
    if isinstance(fusion_k, bool) or not isinstance(fusion_k, int) or fusion_k < 1:
        raise ConfigError(f"--fusion_k must be a positive number of candidates, got {fusion_k!r}")
    dev = resolve_device(device)
    loaded = load_for_use(checkpoint, dev, vocab_path, data_name, shortlist=keep_head)
    config = loaded.config
    if not max_memory_gb > 0:
        raise ConfigError(f"max_memory_gb must be positive, got {max_memory_gb}")
    data_path = data_path if data_path is not None else config.data_path
    if fit_fusion:
        if eval_split is None:
            raise ConfigError("--fit_fusion chooses the fusion weight on the evaluation split; give one")
        check_split(data_path, config.data_name, eval_split)         # before the training, not after it
    ckpt = read_checkpoint(checkpoint)
    extra = dict(ckpt["extra"])
    if keep_head:
        fields = {name: getattr(config, name) for name in _HEAD_FIELDS}
        head, history, kept, encode_seconds = loaded.model.shortlist, [], None, 0.0
        recall = (extra.get("shortlist_fit") or {}).get("recall")
    else:
        fields = dict(shortlist_dim=dim or config.shortlist_dim or SHORTLIST_DIM,
                      shortlist_hidden=config.shortlist_hidden if hidden is None else hidden,
                      shortlist_loss=loss or config.shortlist_loss,
                      shortlist_epochs=epochs or config.shortlist_epochs,
                      shortlist_batch_size=batch_size or config.shortlist_batch_size,
                      shortlist_learning_rate=learning_rate or config.shortlist_learning_rate,
                      shortlist_temperature=temperature or config.shortlist_temperature)
        if fields["shortlist_loss"] not in SHORTLIST_LOSSES:
            raise ConfigError(f"shortlist loss must be one of {SHORTLIST_LOSSES}, got {fields['shortlist_loss']!r}")
        config = config.replace(**fields)                  # validates the values (one-line ConfigError)
        head, history, kept, cpi, encode_seconds = _train_head_of(loaded, config, data_path, seed, max_memory_gb,
                                                                  dev, progress, start)
        recall = None
        if eval_split is not None:
            recall = split_recall(loaded.model, head, data_path, config.data_name, eval_split, loaded.vocab,
                                  progress=progress)
        extra["shortlist_fit"] = {"source": str(checkpoint), "epochs": config.shortlist_epochs,
                                  "loss_history": history, "recall": recall, "train_images": kept,
                                  "train_captions": kept * cpi}
    # The output model: the checkpoint's weights, untouched, plus the head (fitted or kept).
    model = build_model(config.replace(shortlist_fusion=0.0))
    load_state(model, ckpt["model"], checkpoint, head.state_dict())
    fusion = None
    if fit_fusion:
        fusion = choose_fusion(LoadedModel(loaded.path, model.to(dev).eval(), model.config, loaded.vocab),
                               data_path, eval_split, k=fusion_k, progress=progress)
        extra["shortlist_fusion_fit"] = fusion
    else:
        extra.pop("shortlist_fusion_fit", None)
    config = config.replace(shortlist_fusion=fusion["lambda"] if fusion else 0.0)
    save_checkpoint(out, model, config, epoch=ckpt["epoch"], iteration=ckpt["iteration"],
                    best_rsum=ckpt["best_rsum"], extra=extra)
    return {"out": str(out), "seconds": time.time() - start, "encode_seconds": encode_seconds,
            "loss_history": history, "recall": recall, "train_images": kept, "config": fields, "fusion": fusion}


#: The head's options, which a kept head keeps.
_HEAD_FIELDS = ("shortlist_dim", "shortlist_hidden", "shortlist_loss", "shortlist_epochs", "shortlist_batch_size",
                "shortlist_learning_rate", "shortlist_temperature")


def _train_head_of(loaded, config, data_path, seed: int, max_memory_gb: float, dev, progress: bool, start: float):
    """A new head trained on the frozen training embeddings: ``(head, loss history, images kept,
    captions per image, encoding seconds)``."""
    opened = loaded.open_split(data_path, "train")
    train_set = opened.dataset
    frozen, kept = frozen_embeddings(loaded.model, opened.images, opened.token_ids,
                                     train_set.captions_per_image, pooled=config.shortlist_hidden == 0,
                                     max_memory_gb=max_memory_gb, seed=seed, progress=progress,
                                     source=opened.source, desc="encode train")
    if kept < train_set.num_images:
        print(f"vsl: note: fitting the shortlist head on {kept:,} of the {train_set.num_images:,} training images "
              f"(their embeddings fill max_memory_gb {max_memory_gb:g})", file=sys.stderr)
    encode_seconds = time.time() - start
    torch.manual_seed(seed)
    head = ShortlistHead(config.embed_size, config.shortlist_dim, config.shortlist_hidden).to(dev)
    history = train_head(head, frozen, epochs=config.shortlist_epochs, batch_size=config.shortlist_batch_size,
                         learning_rate=config.shortlist_learning_rate, loss=config.shortlist_loss,
                         temperature=config.shortlist_temperature, seed=seed, device=dev, progress=progress)
    return head, history, kept, train_set.captions_per_image, encode_seconds


def split_recall(model, head: ShortlistHead, data_path: PathLike, data_name: str, split: str, vocab, *,
                 progress: bool = True, ks=REPORT_KS) -> Optional[Dict[str, Dict[str, float]]]:
    """Shortlist recall of ``head`` on ``split`` (None when the data has no such split)."""
    if not all(p.is_file() for p in split_files(data_path, data_name, split)):
        return None
    from ..data import PrecompDataset

    dataset = PrecompDataset(data_path, data_name, split, vocab)
    tokens = [vocab.encode(c) for c in dataset.captions]
    img_vecs, cap_vecs = global_vectors(model, head, dataset.images[:dataset.num_images], tokens,
                                        progress=progress, source=str(dataset.images_path), desc=f"encode {split}")
    return shortlist_recall(img_vecs, cap_vecs, dataset.captions_per_image, ks)
