"""Using a trained model: load a checkpoint once, open a split against it, encode in batches.

The one setup chain of evaluation, validation, ``vsl fit-shortlist``, ``vsl index`` and search:

* :func:`load_for_use`: a checkpoint (published or vsl format) as an eval-mode model on a device,
  with its vocabulary and options (precision, scoring chunk), optionally requiring a shortlist head;
* :meth:`LoadedModel.open_split`: a split of the SCAN layout checked against the model, with its
  captions' token ids;
* :func:`image_batches` / :func:`caption_batches`: the batched encoders every caller runs (a
  memmap is read one batch at a time), and :func:`encode_split`, which collects both;
* :func:`pad_token_ids` / :func:`padded_words`: captions as zero-padded id and embedding tensors.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .checkpoint import load_state, read_checkpoint
from .config import Config
from .data import PrecompDataset, Vocabulary, check_finite, check_fits, vocab_file
from .errors import CheckpointError
from .logs import progress_bar
from .models import VSLModel, build_model
from .precision import precision_context

PathLike = Union[str, os.PathLike]


# --------------------------------------------------------------------------------------------
# Captions as tensors
# --------------------------------------------------------------------------------------------
def pad_token_ids(token_ids: Sequence[Sequence[int]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Zero-padded ``(m, L)`` int64 ids and ``(m,)`` lengths of a list of id lists."""
    lengths = torch.tensor([len(t) for t in token_ids], dtype=torch.int64)
    if (lengths == 0).any():
        raise ValueError("empty token list")
    flat = torch.tensor([i for t in token_ids for i in t], dtype=torch.int64)
    ids = torch.zeros(len(token_ids), int(lengths.max()), dtype=torch.int64)
    ids[torch.arange(ids.size(1)) < lengths.unsqueeze(1)] = flat     # row-major fill = caption order
    return ids, lengths


def padded_words(words, starts: np.ndarray, lengths: np.ndarray) -> torch.Tensor:
    """Captions stored packed (word embeddings one caption after another, ``words (W, d)``: a memmap,
    an array or a CPU tensor) as zero-padded ``(len, L, d)`` float32: caption j is rows
    ``starts[j] : starts[j] + lengths[j]``. One gather of just those rows (a memmap reads no others),
    scattered into the padded layout."""
    width = int(lengths.max())
    rows = starts[:, None] + np.arange(width)[None, :]
    valid = np.arange(width)[None, :] < lengths[:, None]
    out = np.zeros((len(starts), width, words.shape[1]), dtype=np.float32)
    out[valid] = np.asarray(words[rows[valid]], dtype=np.float32)
    return torch.from_numpy(out)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
@dataclass
class OpenSplit:
    """A split checked against a model: the dataset, its images ``(n, R, D)`` (a memmap) and the
    token ids of its captions (``cpi * n`` lists)."""

    dataset: PrecompDataset
    token_ids: List[List[int]]

    @property
    def images(self) -> np.ndarray:
        return self.dataset.images[:self.dataset.num_images]

    @property
    def source(self) -> str:
        return str(self.dataset.images_path)


@dataclass
class LoadedModel:
    """A checkpoint loaded for use: ``model`` in eval mode on its device, its ``config`` (with the
    overrides applied) and ``vocab``; ``path`` names it in messages."""

    path: Path
    model: VSLModel
    config: Config
    vocab: Vocabulary

    def require_shortlist(self) -> "LoadedModel":
        """Itself, or a CheckpointError naming ``vsl fit-shortlist`` when the model has no shortlist head."""
        require_shortlist(self.model, self.path)
        return self

    def open_split(self, data_path: Optional[PathLike], split: str) -> OpenSplit:
        """``split`` of ``data_path`` (default: the checkpoint's) with the model's dataset name and
        vocabulary, checked to fit the model (feature size, regions, vocabulary)."""
        data_path = data_path if data_path is not None else self.config.data_path
        dataset = PrecompDataset(data_path, self.config.data_name, split, self.vocab)
        check_fits(self.config, dataset, self.vocab, source=self.path)
        return OpenSplit(dataset, [self.vocab.encode(c) for c in dataset.captions])


def require_shortlist(model, source: PathLike) -> None:
    """CheckpointError naming ``vsl fit-shortlist`` when ``model`` has no shortlist head."""
    if getattr(model, "shortlist", None) is None:
        raise CheckpointError(f"{source}: checkpoint has no shortlist head; fit one first with "
                              f"`vsl fit-shortlist --checkpoint {source} --data_path DATA --out CK2` "
                              "(or train with --shortlist_weight) and index with CK2")


def load_for_use(path: PathLike, device: torch.device, vocab_path: Optional[PathLike] = None,
                 data_name: Optional[str] = None, *, shortlist: bool = False, **overrides) -> LoadedModel:
    """A checkpoint (published or vsl format) as an eval-mode model plus its vocabulary.

    The vocabulary is ``{vocab_path}/{data_name}_vocab.json``, both taken from the checkpoint's
    options unless given (published checkpoints hold no vocabulary). ``overrides`` replace options
    that do not change the weights (``precision``, ``score_chunk``); None values are ignored.
    ``shortlist``: the checkpoint must have a shortlist head (:meth:`LoadedModel.require_shortlist`).
    """
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
    load_state(model, ckpt["model"], path, ckpt["shortlist"])
    loaded = LoadedModel(path, model.to(device).eval(), config, vocab)
    return loaded.require_shortlist() if shortlist else loaded


# --------------------------------------------------------------------------------------------
# Batched encoding
# --------------------------------------------------------------------------------------------
def read_images(images, start: int, stop: int, source: str, rows: Optional[np.ndarray] = None) -> np.ndarray:
    """Images ``[start, stop)`` (or ``rows[start:stop]``) of an array, a memmap or a gallery with a
    ``read(start, stop)`` method, as a fresh float32 ``(b, R, D)`` array; NaN/inf is a DataError."""
    if rows is not None:
        array = np.asarray(images[rows[start:stop]], dtype=np.float32)     # reads only these rows of a memmap
        check_finite(array, source, image_ids=rows[start:stop])
        return array
    if hasattr(images, "read"):
        return images.read(start, stop)
    # A copy: memmaps are read-only, and only this batch is read from disk.
    array = np.array(images[start:stop], dtype=np.float32)
    check_finite(array, source, start)
    return array


def image_batches(model: VSLModel, images, *, batch_size: int, start: int = 0, stop: Optional[int] = None,
                  rows: Optional[np.ndarray] = None, source: str = "image features",
                  bar=None) -> Iterator[Tuple[int, int, torch.Tensor]]:
    """``(i, j, emb)`` for images ``i:j`` of ``[start, stop)`` (of ``rows`` when given), ``batch_size``
    at a time: ``emb (j - i, R, d)`` region embeddings on the model's device. ``bar`` advances by images."""
    stop = (len(rows) if rows is not None else len(images)) if stop is None else stop
    for i in range(start, stop, batch_size):
        j = min(stop, i + batch_size)
        array = read_images(images, i, j, source, rows)
        yield i, j, model.encode_images(torch.from_numpy(array).to(model.device))
        if bar is not None:
            bar.update(j - i)


def caption_batches(model: VSLModel, ids: torch.Tensor, lengths: torch.Tensor, *, batch_size: int, start: int = 0,
                    stop: Optional[int] = None, bar=None) -> Iterator[Tuple[int, int, torch.Tensor, torch.Tensor]]:
    """``(i, j, emb, lens)`` for captions ``i:j`` of padded ``ids (m, L)`` / ``lengths (m,)``:
    ``emb (j - i, max(lens), d)`` word embeddings on the model's device, ``lens`` on the CPU."""
    stop = len(lengths) if stop is None else stop
    for i in range(start, stop, batch_size):
        j = min(stop, i + batch_size)
        lens = lengths[i:j]
        yield i, j, model.encode_captions(ids[i:j, :int(lens.max())].to(model.device), lens), lens
        if bar is not None:
            bar.update(j - i)


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
        img_parts = [emb.float() for _, _, emb in image_batches(model, images, batch_size=batch_size,
                                                                source=source, bar=bar)]
        cap_emb = None
        for i, j, emb, _ in caption_batches(model, ids, lengths, batch_size=batch_size, bar=bar):
            emb = emb.float()
            if cap_emb is None:
                cap_emb = emb.new_zeros(m, ids.size(1), emb.size(-1))
            cap_emb[i:j, :emb.size(1)] = emb
    bar.close()
    img_emb = torch.cat(img_parts) if img_parts else torch.zeros(0, device=device)
    return Embeddings(img_emb, cap_emb, lengths)
