"""``vsl search``: a built index (:mod:`.store`, :mod:`.build`), loaded once and searched in two stages.

A search encodes the query, takes the shortlist (the top ``shortlist`` gallery items by cosine from
the FAISS index, :func:`vsl.retrieval.faiss_index.search`), scores only those with the exact model
and returns the best ``k`` (:func:`vsl.rerank.rerank`, both directions); ``shortlist=0`` scores the
whole gallery exactly.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..data.precomp import companion_path
from ..errors import CheckpointError, ConfigError, DataError
from ..rerank import rerank
from ..runtime import pad_token_ids, padded_words
from .faiss_index import excluding, read_faiss, search
from .grow import generation, removed_images
from .segments import (caption_offsets, caption_texts, faiss_files, open_side, read_rows, segment_file, segments,
                       sources)
from .store import read_manifest, sha256_file

PathLike = Union[str, os.PathLike]
#: Generations tried when the one read is replaced while it is opened.
LOAD_ATTEMPTS = 3
#: Images whose regions are scored at once in exhaustive search (bounds the float32 copy).
EXHAUSTIVE_BLOCK = 2048


@dataclass
class SearchHit:
    """One result: ``id`` is an image index (text queries) or a caption index (image queries)."""

    rank: int
    id: int
    score: float
    shortlist_score: float
    captions: List[str] = field(default_factory=list)
    #: The exact model's score; ``score`` is ``exact_score + fusion * shortlist_score`` (:mod:`vsl.rerank`).
    exact_score: Optional[float] = None

    def to_dict(self) -> Dict[str, Any]:
        return {"rank": self.rank, "id": self.id, "score": self.score, "exact_score": self.exact_score,
                "shortlist_score": self.shortlist_score, "captions": list(self.captions)}


@dataclass
class SearchResult:
    """The hits of one query, best first; ``k`` and ``shortlist`` after clamping to the gallery."""

    query: Union[str, int]
    hits: List[SearchHit]
    unknown_words: List[str]
    k: int
    shortlist: int
    seconds: float

    def to_dict(self) -> Dict[str, Any]:
        return {"query": self.query, "results": [h.to_dict() for h in self.hits],
                "unknown_words": list(self.unknown_words), "k": self.k, "shortlist": self.shortlist,
                "seconds": self.seconds}


def source_path(source: Dict[str, Any], suffix: str) -> Optional[Path]:
    """A file or folder beside indexed features, when it exists: ``{split}{suffix}`` in
    ``{data_path}/{data_name}/`` for a split, or beside a gallery's one feature file ``X_ims.npy``
    (``X{suffix}``), e.g. the ``_boxes.npy``, ``_sizes.npy`` and ``_thumbs`` of ``vsl extract``."""
    if all(isinstance(source.get(k), str) for k in ("data_path", "data_name", "split")):
        path = Path(source["data_path"]) / source["data_name"] / f"{source['split']}{suffix}"
    elif len(source.get("features") or ()) == 1:
        path = companion_path(source["features"][0], suffix)
    else:
        return None
    return path if path.exists() else None


class Index:
    """A built index, loaded once: the model, the FAISS indexes and the memory-mapped embeddings.

    Use :meth:`load`; then :meth:`search_text` (text -> images) and :meth:`search_image`
    (image -> captions).
    """

    def __init__(self, path: Path, manifest: Dict[str, Any], model, vocab, device: torch.device):
        self.path, self.manifest, self.model, self.vocab, self.device = path, manifest, model, vocab, device
        self.num_images: int = int(manifest["num_images"])
        self.num_captions: int = int(manifest["num_captions"])
        self.captions_per_image: int = int(manifest["captions_per_image"])
        # What each generation indexed (pictures, boxes) and the first image id of each.
        self.sources = sources(manifest)
        self._source_firsts = np.array([s["first_image"] for s in self.sources], dtype=np.int64)
        # Rows of all segments (:mod:`.segments`), addressed by id through the id maps.
        self.image_rows = read_rows(path, manifest, "images", self.num_images)
        self.caption_rows = read_rows(path, manifest, "captions", self.num_captions)
        self.regions = open_side(path, manifest, "regions")                # (rows, R, d)
        self.image_global = open_side(path, manifest, "image_global")      # (rows, D)
        faiss = faiss_files(manifest)
        self.image_faiss = read_faiss(path / faiss["images"])
        self.captions: List[str] = []
        if self.num_captions:
            self.words = open_side(path, manifest, "words")                # (words, d)
            self.offsets = caption_offsets(path, manifest)                 # (caption rows + 1,)
            self.caption_global = open_side(path, manifest, "caption_global")
            self.caption_faiss = read_faiss(path / faiss["captions"])
            self.captions = caption_texts(path, manifest)                  # by caption row
        self._check_shapes()
        # Tombstones of this generation (:mod:`.grow`): removed images, and their split's captions.
        self.generation: int = generation(manifest)
        self.removed = removed_images(path, manifest)
        cpi = self.captions_per_image
        self.removed_captions = (self.removed[:, None] * cpi + np.arange(cpi)).reshape(-1) if cpi else \
            np.zeros(0, dtype=np.int64)
        self._image_selector, self._caption_selector = excluding(self.removed), excluding(self.removed_captions)
        # Rows still holding removed ids (none after a compaction): masked in exhaustive search.
        self._removed_image_rows = self.image_rows.rows(self.removed[self.image_rows.present(self.removed)])
        self._removed_caption_rows = self.caption_rows.rows(
            self.removed_captions[self.caption_rows.present(self.removed_captions)])
        # Score fusion (:mod:`vsl.rerank`): final = exact + fusion * shortlist, the head's stored weight.
        self.fusion: float = float(getattr(getattr(model, "config", None), "shortlist_fusion", 0.0))

    # -- loading ------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: PathLike, device: str = "cpu", checkpoint: Optional[PathLike] = None) -> "Index":
        """Open the index folder ``path`` (checked against its manifest) with the model that built it.

        ``checkpoint`` defaults to the path recorded in the manifest; either way its SHA-256 must
        match the manifest's (a CheckpointError otherwise).
        """
        from ..device import resolve_device
        from ..runtime import load_for_use

        path = Path(path)
        manifest = read_manifest(path)
        ckpt = Path(checkpoint) if checkpoint is not None else Path(manifest["checkpoint"])
        if not ckpt.is_file():
            raise CheckpointError(f"{ckpt}: checkpoint of the index {path} not found (pass --checkpoint)")
        digest = sha256_file(ckpt)
        if digest != manifest["checkpoint_sha256"]:
            raise CheckpointError(f"{ckpt}: SHA-256 {digest[:12]}... does not match the checkpoint the index "
                                  f"{path} was built from ({manifest['checkpoint_sha256'][:12]}..., "
                                  f"{manifest['checkpoint']}); pass that checkpoint or rebuild the index")
        dev = resolve_device(device)
        loaded = load_for_use(ckpt, dev, vocab_path=path, data_name=manifest["data_name"], shortlist=True)
        return cls._open(path, manifest, loaded.model, loaded.vocab, dev)

    @classmethod
    def _open(cls, path: Path, manifest: Dict[str, Any], model, vocab, device) -> "Index":
        """The Index of ``manifest``; when a writer replaced it (and deleted files it listed) between
        reading it and opening the files, the newer generation (same checkpoint) instead."""
        for attempt in range(LOAD_ATTEMPTS):
            try:
                return cls(path, manifest, model, vocab, device)
            except (DataError, OSError):
                newer = read_manifest(path)
                if newer == manifest or newer["checkpoint_sha256"] != manifest["checkpoint_sha256"] or \
                        attempt == LOAD_ATTEMPTS - 1:
                    raise
                manifest = newer

    def reload(self) -> "Index":
        """A new Index of the newest generation of this folder, sharing this one's model (``self`` stays
        usable: searches in flight finish on it)."""
        return type(self)._open(self.path, read_manifest(self.path), self.model, self.vocab, self.device)

    def _check_shapes(self) -> None:
        m = self.manifest
        for part, seg in enumerate(segments(m)):
            rows = int(seg["images"])
            for key, array, want in (("regions", self.regions, (rows, m["num_regions"], m["embed_size"])),
                                     ("image_global", self.image_global, (rows, m["shortlist_dim"]))):
                have = array.parts[part].shape
                if tuple(have) != tuple(want):
                    raise DataError(f"{self.path / segment_file(key, seg['suffix'])}: shape {tuple(have)}, "
                                    f"expected {tuple(want)} (rebuild the index)")
        rows = self.image_rows.num_rows
        if len(self.regions) != rows or self.image_faiss.ntotal != rows:
            raise DataError(f"{self.path / faiss_files(m)['images']}: {self.image_faiss.ntotal} vectors and "
                            f"{len(self.regions)} rows, expected {rows} (rebuild the index)")

    def info(self) -> Dict[str, Any]:
        m = self.manifest
        return {"model": m["model"], "checkpoint": m["checkpoint"], "checkpoint_sha256": m["checkpoint_sha256"],
                "num_images": self.num_images, "num_captions": self.num_captions, "index_type": m["index_type"],
                "dtype": m["dtype"], "split": m.get("split"), "data_name": m["data_name"],
                "vsl_version": m["versions"]["vsl"], "generation": self.generation,
                "num_removed": int(len(self.removed))}

    def captions_of_image(self, image_id: int) -> List[str]:
        """The split's captions of image ``image_id`` ([] for a pure image gallery)."""
        self._check_image_id(image_id)
        cpi = self.captions_per_image
        rows = self.caption_rows.rows(np.arange(cpi * image_id, cpi * (image_id + 1)))
        return [self.captions[r] for r in rows.tolist()]

    # -- checks -------------------------------------------------------------------------------
    def _check_image_id(self, image_id) -> int:
        if isinstance(image_id, bool) or not isinstance(image_id, (int, np.integer)):
            raise ConfigError(f"image id {image_id!r} is not an integer (expected 0..{self.num_images - 1})")
        if not 0 <= int(image_id) < self.num_images:
            raise ConfigError(f"image id {image_id} out of range: the index has {self.num_images} images "
                              f"(ids 0..{self.num_images - 1})")
        if len(self.removed) and np.isin(int(image_id), self.removed):
            raise ConfigError(f"image id {image_id} was removed from the index (generation {self.generation})")
        return int(image_id)

    @staticmethod
    def _sizes(k: int, shortlist: int, gallery: int) -> Tuple[int, int]:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
            raise ConfigError(f"k must be a positive integer, got {k!r}")
        if isinstance(shortlist, bool) or not isinstance(shortlist, (int, np.integer)) or shortlist < 0:
            raise ConfigError(f"shortlist must be a non-negative integer (0 = exhaustive), got {shortlist!r}")
        k = min(int(k), gallery)
        # The hits come from the shortlist, so it holds at least k items.
        return k, (0 if shortlist == 0 else min(gallery, max(int(shortlist), k)))

    # -- text -> images -----------------------------------------------------------------------
    @torch.inference_mode()
    def search_text(self, queries: Sequence[str], k: int = 10, shortlist: int = 100) -> List[SearchResult]:
        """Images for each text query (one batch): exact scores of the top ``shortlist`` by cosine."""
        from ..data import tokenize

        start = time.perf_counter()
        if isinstance(queries, str):
            queries = [queries]
        if not queries:
            raise ConfigError("no queries given (expected one or more non-empty texts)")
        for q in queries:
            if not isinstance(q, str) or not tokenize(q):
                raise ConfigError(f"empty query {q!r} (expected a text with at least one word)")
        k, shortlist = self._sizes(k, shortlist, self.num_images - len(self.removed))
        unknown = [[w for w in tokenize(q) if w not in self.vocab] for q in queries]
        ids, lengths = pad_token_ids([self.vocab.encode(q) for q in queries])
        cap_emb = self.model.encode_captions(ids.to(self.device), lengths)             # (Q, L, d)
        cap_vec = self.model.shortlist.captions(cap_emb, lengths.to(self.device)).float()   # (Q, D)
        if shortlist:
            cos, cand = search(self.image_faiss, cap_vec.cpu().numpy(), shortlist,
                               self._image_selector)                # (Q, S)
            hit_ids, hit_scores, hit_exact, hit_cos = rerank(
                cand, cos, lambda uniq, query, item: self.model.sim_enc.score_pairs(
                    self._regions(uniq), cap_emb, lengths, item, query), k, self.fusion)
        else:
            exact = self._exhaustive_images(cap_emb, lengths)             # (Q, rows)
            hit_ids, hit_scores, hit_exact, hit_cos = self._exhaustive_top(
                exact, self.image_global, self.image_rows, cap_vec.cpu().numpy(), self._removed_image_rows, k)
        seconds = time.perf_counter() - start
        return [SearchResult(query=q, unknown_words=unknown[i], k=k, shortlist=shortlist, seconds=seconds,
                             hits=[SearchHit(rank=r + 1, id=int(hit_ids[i, r]), score=float(hit_scores[i, r]),
                                             shortlist_score=float(hit_cos[i, r]), exact_score=float(hit_exact[i, r]),
                                             captions=self.captions_of_image(int(hit_ids[i, r])))
                                   for r in range(hit_ids.shape[1]) if hit_ids[i, r] >= 0])
                for i, q in enumerate(queries)]

    # -- explaining a match -------------------------------------------------------------------
    def split_path(self, suffix: str) -> Optional[Path]:
        """A file or folder beside the first indexed features, when it exists (:func:`source_path`)."""
        return source_path(self.sources[0]["source"], suffix)

    def _sources_of(self, image_ids: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """For each image id: the index into the manifest's sources, and the image's number there."""
        which = np.searchsorted(self._source_firsts, image_ids, side="right") - 1
        return which, image_ids - self._source_firsts[which]

    def picture(self, image_id: int) -> Optional[Path]:
        """The picture of a gallery image (``{n}.png`` in its source's ``_thumbs/``), when there is one."""
        which, local = self._sources_of(np.array([int(image_id)]))
        folder = source_path(self.sources[int(which[0])]["source"], "_thumbs")
        path = folder / f"{int(local[0])}.png" if folder is not None else None
        return path if path is not None and path.is_file() else None

    @property
    def can_explain(self) -> bool:
        """Whether some indexed source has region boxes (``{split}_boxes.npy`` and ``_sizes.npy``)."""
        return any(source_path(s["source"], "_boxes.npy") is not None and
                   source_path(s["source"], "_sizes.npy") is not None for s in self.sources)

    def explain(self, query: str, image_ids: Sequence[int]) -> List[Optional[Dict[str, Any]]]:
        """Which regions of each image the words of ``query`` attend to under the exact model.

        Returns one ``{"words", "boxes", "attention", "image_size"}`` per image: the query's words
        (the tokenizer's, without ``<start>``/``<end>``), the image's region boxes ``(R, 4)`` x1 y1 x2 y2
        in its own pixels, the ``(words, R)`` attention weights (each row sums to 1) and
        ``[width, height]``; None for an image whose source has no boxes. A DataError when no
        indexed source has boxes.
        """
        from ..data import tokenize
        from ..models.explain import word_region_attention

        if not self.can_explain:
            raise DataError(f"{self.path}: the indexed gallery has no region boxes to explain matches with "
                            f"(its split needs _boxes.npy and _sizes.npy, as vsl extract writes)")
        ids = np.asarray([self._check_image_id(i) for i in image_ids], dtype=np.int64)
        words = tokenize(query)
        tokens, lengths = pad_token_ids([self.vocab.encode(query)])
        with torch.no_grad():
            cap = self.model.encode_captions(tokens.to(self.device), lengths)             # (1, L, d): once
            P = len(ids)
            attention = word_region_attention(self._regions(ids), cap.expand(P, -1, -1),
                                              lengths.expand(P).to(self.device))              # (P, L, R)
        attention = attention[:, 1:1 + len(words)].float().cpu().numpy()                 # drop <start>, <end>
        which, local = self._sources_of(ids)
        found = {}
        for w in np.unique(which).tolist():
            source = self.sources[w]["source"]
            boxes, sizes = source_path(source, "_boxes.npy"), source_path(source, "_sizes.npy")
            if boxes is not None and sizes is not None:
                found[w] = (np.load(boxes, mmap_mode="r"), np.load(sizes, mmap_mode="r"))   # sizes (N, 2) h, w
        return [None if w not in found else
                {"words": words, "boxes": np.asarray(found[w][0][i], dtype=np.float32).round(1).tolist(),
                 "attention": attention[p].round(4).tolist(),
                 "image_size": [int(found[w][1][i][1]), int(found[w][1][i][0])]}
                for p, (w, i) in enumerate(zip(which.tolist(), local.tolist()))]

    def _regions(self, image_ids: np.ndarray) -> torch.Tensor:
        """Region embeddings of ``image_ids`` (sorted) as float32 ``(len, R, d)`` on the device."""
        return self._region_rows(self.image_rows.rows(image_ids))

    def _region_rows(self, rows: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.regions[rows], dtype=np.float32)).to(self.device)

    def _exhaustive_images(self, cap_emb: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Exact scores ``(Q, rows)`` of the queries against every image row."""
        n = len(self.regions)
        rows = [self.model.similarity(self._region_rows(np.arange(i, min(n, i + EXHAUSTIVE_BLOCK))),
                                      cap_emb, lengths).float().cpu()
                for i in range(0, n, EXHAUSTIVE_BLOCK)]
        return torch.cat(rows, dim=0).t()

    # -- image -> captions --------------------------------------------------------------------
    @torch.inference_mode()
    def search_image(self, image_ids: Sequence[int], k: int = 10, shortlist: int = 100) -> List[SearchResult]:
        """Captions for each gallery image (one batch): exact scores of the top ``shortlist`` by cosine."""
        start = time.perf_counter()
        if isinstance(image_ids, (int, np.integer)):
            image_ids = [image_ids]
        if not self.num_captions:
            raise ConfigError(f"{self.path}: a pure image gallery has no captions to search; image->text search "
                              "needs an index built from a split with captions")
        if len(image_ids) == 0:
            raise ConfigError("no image ids given")
        ids = np.array([self._check_image_id(i) for i in image_ids], dtype=np.int64)
        k, shortlist = self._sizes(k, shortlist, self.num_captions - len(self.removed_captions))
        img_emb = self._regions(ids)                                                       # (Q, R, d)
        img_vec = np.asarray(self.image_global[self.image_rows.rows(ids)], dtype=np.float32)
        if shortlist:
            cos, cand = search(self.caption_faiss, img_vec, shortlist, self._caption_selector)                            # (Q, S)
            hit_ids, hit_scores, hit_exact, hit_cos = rerank(
                cand, cos, lambda uniq, query, item: self.model.sim_enc.score_pairs(
                    img_emb, *self._caption_words(uniq), query, item), k, self.fusion)
        else:
            parts, m = [], len(self.caption_global)
            for j in range(0, m, EXHAUSTIVE_BLOCK):
                cap_emb, lengths = self._caption_word_rows(np.arange(j, min(m, j + EXHAUSTIVE_BLOCK)))
                parts.append(self.model.similarity(img_emb, cap_emb, lengths).float().cpu())
            exact = torch.cat(parts, dim=1)                                              # (Q, caption rows)
            hit_ids, hit_scores, hit_exact, hit_cos = self._exhaustive_top(
                exact, self.caption_global, self.caption_rows, img_vec, self._removed_caption_rows, k)
        seconds = time.perf_counter() - start
        return [SearchResult(query=int(q), unknown_words=[], k=k, shortlist=shortlist, seconds=seconds,
                             hits=[SearchHit(rank=r + 1, id=int(hit_ids[i, r]), score=float(hit_scores[i, r]),
                                             shortlist_score=float(hit_cos[i, r]), exact_score=float(hit_exact[i, r]),
                                             captions=[self.captions[int(self.caption_rows.rows(hit_ids[i, r]))]])
                                   for r in range(hit_ids.shape[1]) if hit_ids[i, r] >= 0])
                for i, q in enumerate(ids)]

    def _exhaustive_top(self, exact: torch.Tensor, gallery_global, rows_map, query_vecs: np.ndarray,
                        removed_rows: np.ndarray, k: int) -> Tuple[np.ndarray, ...]:
        """The best ``k`` of ``exact`` ``(Q, rows)`` (every gallery row scored) by the fused score:
        ``(ids, scores, exact scores, shortlist cosines)``, each ``(Q, k)``; ``gallery_global`` the
        rows' shortlist vectors (:class:`.segments.Stacked`), ``rows_map`` their ids (:class:`.segments.Rows`)."""
        from ..rerank import reranked_score

        if self.fusion:       # every item's cosine: the fused ranking of a shortlist of the whole gallery
            everything = np.asarray(gallery_global[np.arange(len(gallery_global))], dtype=np.float32)
            final = reranked_score(exact, torch.from_numpy(query_vecs @ everything.T), self.fusion)
        else:
            final = exact.clone()
        final[:, torch.from_numpy(removed_rows)] = float("-inf")
        top = torch.topk(final, k, dim=1)
        rows = top.indices.numpy()
        hit_exact = np.take_along_axis(exact.numpy(), rows, 1)
        hit_cos = np.einsum("qkd,qd->qk", np.asarray(gallery_global[rows], dtype=np.float32), query_vecs)
        return rows_map.ids_of(rows), top.values.numpy(), hit_exact, hit_cos

    def _caption_words(self, caption_ids: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
        """Zero-padded word embeddings ``(len, L, d)`` float32 and lengths ``(len,)`` of ``caption_ids``."""
        return self._caption_word_rows(self.caption_rows.rows(caption_ids))

    def _caption_word_rows(self, rows: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
        starts = self.offsets[rows]
        lengths = self.offsets[rows + 1] - starts
        return padded_words(self.words, starts, lengths).to(self.device), torch.from_numpy(lengths)
