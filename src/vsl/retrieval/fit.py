"""``vsl fit-shortlist``: train only the shortlist head of a frozen checkpoint (the published ones included).

The encoders are frozen, so each training image and caption is encoded once: the image's mean
region embedding ``(n, d)`` and the caption's mean word embedding ``(m, d)`` (what the head pools)
are kept in memory, and the head's epochs run over those small matrices, in seconds to minutes on a
CPU. The output checkpoint holds the original weights unchanged plus the head, so its exact scores
and its ``vsl eval`` table are those of the input checkpoint.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..checkpoint import load_state, read_checkpoint, save_checkpoint
from ..config import SHORTLIST_DIM, SHORTLIST_LOSSES
from ..data import PrecompDataset, check_finite, check_fits
from ..device import resolve_device
from ..errors import ConfigError
from ..evaluation import load_for_eval, pad_token_ids
from ..fileio import check_writable
from ..logs import progress_bar
from ..models import build_model
from ..models.shortlist import ShortlistHead, masked_mean, shortlist_loss
from .recall import REPORT_KS, shortlist_recall

PathLike = Union[str, os.PathLike]


@torch.inference_mode()
def pooled_embeddings(model, images: np.ndarray, token_ids: Sequence[Sequence[int]], *, batch_size: int = 256,
                      progress: bool = True, source: str = "image features",
                      desc: str = "encode") -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean region embedding of each image ``(n, d)`` and mean word embedding of each caption ``(m, d)``.

    Only the pooled vectors are kept (a COCO training split's region embeddings would take 16 GB).
    """
    device = model.device
    ids, lengths = pad_token_ids(token_ids)
    n, m = len(images), len(token_ids)
    bar = progress_bar(n + m, desc, enabled=progress, unit="item", unit_scale=True)
    img_parts, cap_parts = [], []
    for i in range(0, n, batch_size):
        array = np.array(images[i:i + batch_size], dtype=np.float32)
        check_finite(array, source, i)
        img_parts.append(model.encode_images(torch.from_numpy(array).to(device)).mean(dim=1).float().cpu())
        bar.update(len(array))
    for j in range(0, m, batch_size):
        lens = lengths[j:j + batch_size]
        words = model.encode_captions(ids[j:j + batch_size, :int(lens.max())].to(device), lens)
        cap_parts.append(masked_mean(words, lens.to(device)).float().cpu())
        bar.update(len(lens))
    bar.close()
    return torch.cat(img_parts), torch.cat(cap_parts)


def train_head(head: ShortlistHead, img_pooled: torch.Tensor, cap_pooled: torch.Tensor, captions_per_image: int,
               *, epochs: int, batch_size: int, learning_rate: float, loss: str, temperature: float,
               seed: int = 0, progress: bool = True) -> list:
    """Adam on the head over all captions per epoch (each with its image); returns the mean loss per epoch."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(head.parameters(), lr=learning_rate)
    m = cap_pooled.size(0)
    steps = -(-m // batch_size)
    # Cosine decay to zero over the run: the last epochs settle instead of oscillating.
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs * steps))
    history = []
    bar = progress_bar(epochs, "fit shortlist", enabled=progress, unit="epoch")
    head.train()
    for _ in range(epochs):
        order = torch.randperm(m, generator=generator)
        total = 0.0
        for s in range(steps):
            idx = order[s * batch_size:(s + 1) * batch_size]
            image_ids = idx // captions_per_image
            value = shortlist_loss(head.pooled_images(img_pooled[image_ids]), head.pooled_captions(cap_pooled[idx]),
                                   image_ids, loss=loss, temperature=temperature)
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
            schedule.step()
            total += float(value.detach())
        history.append(total / steps)
        bar.update(1)
        bar.set_postfix(loss=f"{history[-1]:.4g}", refresh=False)
    bar.close()
    head.eval()
    return history


def fit_shortlist(checkpoint: PathLike, data_path: Optional[PathLike] = None, out: PathLike = "shortlist.pth.tar", *,
                  vocab_path: Optional[PathLike] = None, data_name: Optional[str] = None, device: str = "auto",
                  dim: Optional[int] = None, loss: Optional[str] = None, epochs: Optional[int] = None,
                  batch_size: Optional[int] = None, learning_rate: Optional[float] = None,
                  temperature: Optional[float] = None, seed: int = 0, eval_split: Optional[str] = "dev",
                  progress: bool = True) -> Dict[str, Any]:
    """Fit a shortlist head on the training split of a frozen ``checkpoint`` and write ``out``.

    Options left ``None`` come from the checkpoint's configuration (``shortlist_dim`` falls back to
    :data:`vsl.config.SHORTLIST_DIM` when the checkpoint has no head). The head's shortlist recall at
    K = 10/50/100/200 on ``eval_split`` (if the data has it) is returned and stored in the checkpoint.

    Returns ``{"out", "seconds", "encode_seconds", "loss_history", "recall": {"i2t": {...}, "t2i": {...}},
    "config": {shortlist fields}}``.
    """
    start = time.time()
    out = Path(out)
    check_writable(out, "file")
    dev = resolve_device(device)
    loaded = load_for_eval(checkpoint, dev, vocab_path, data_name)
    config = loaded.config
    fields = dict(shortlist_dim=dim or config.shortlist_dim or SHORTLIST_DIM,
                  shortlist_loss=loss or config.shortlist_loss,
                  shortlist_epochs=epochs or config.shortlist_epochs,
                  shortlist_batch_size=batch_size or config.shortlist_batch_size,
                  shortlist_learning_rate=learning_rate or config.shortlist_learning_rate,
                  shortlist_temperature=temperature or config.shortlist_temperature)
    if fields["shortlist_loss"] not in SHORTLIST_LOSSES:
        raise ConfigError(f"shortlist loss must be one of {SHORTLIST_LOSSES}, got {fields['shortlist_loss']!r}")
    config = config.replace(**fields)                  # validates the values (one-line ConfigError)
    data_path = data_path if data_path is not None else config.data_path
    train_set = PrecompDataset(data_path, config.data_name, "train", loaded.vocab)
    check_fits(config, train_set, loaded.vocab, source=checkpoint)
    tokens = [loaded.vocab.encode(c) for c in train_set.captions]
    img_pooled, cap_pooled = pooled_embeddings(loaded.model, train_set.images[:train_set.num_images], tokens,
                                               progress=progress, source=str(train_set.images_path),
                                               desc="encode train")
    encode_seconds = time.time() - start
    torch.manual_seed(seed)
    head = ShortlistHead(config.embed_size, config.shortlist_dim)
    history = train_head(head, img_pooled, cap_pooled, train_set.captions_per_image,
                         epochs=config.shortlist_epochs, batch_size=config.shortlist_batch_size,
                         learning_rate=config.shortlist_learning_rate, loss=config.shortlist_loss,
                         temperature=config.shortlist_temperature, seed=seed, progress=progress)
    recall = None
    if eval_split is not None:
        recall = split_recall(loaded.model, head, data_path, config.data_name, eval_split, loaded.vocab,
                              progress=progress)
    # The output model: the checkpoint's weights, untouched, plus the fitted head.
    ckpt = read_checkpoint(checkpoint)
    model = build_model(config)
    load_state(model, ckpt["model"], checkpoint, head.state_dict())
    summary = {"source": str(checkpoint), "epochs": config.shortlist_epochs, "loss_history": history,
               "recall": recall, "train_images": train_set.num_images, "train_captions": len(tokens)}
    extra = dict(ckpt["extra"])
    extra["shortlist_fit"] = summary
    save_checkpoint(out, model, config, epoch=ckpt["epoch"], iteration=ckpt["iteration"],
                    best_rsum=ckpt["best_rsum"], extra=extra)
    return {"out": str(out), "seconds": time.time() - start, "encode_seconds": encode_seconds,
            "loss_history": history, "recall": recall, "config": fields}


def split_recall(model, head: ShortlistHead, data_path: PathLike, data_name: str, split: str, vocab, *,
                 progress: bool = True, ks=REPORT_KS) -> Optional[Dict[str, Dict[str, float]]]:
    """Shortlist recall of ``head`` on ``split`` (None when the data has no such split)."""
    from ..data import split_files

    if not all(p.is_file() for p in split_files(data_path, data_name, split)):
        return None
    dataset = PrecompDataset(data_path, data_name, split, vocab)
    tokens = [vocab.encode(c) for c in dataset.captions]
    img_pooled, cap_pooled = pooled_embeddings(model, dataset.images[:dataset.num_images], tokens,
                                               progress=progress, source=str(dataset.images_path),
                                               desc=f"encode {split}")
    with torch.no_grad():
        return shortlist_recall(head.pooled_images(img_pooled), head.pooled_captions(cap_pooled),
                                dataset.captions_per_image, ks)
