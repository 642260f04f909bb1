"""``vsl index`` / ``vsl search``: a gallery encoded once, searched in two stages.

An index folder holds, for a checkpoint with a shortlist head (:mod:`vsl.models.shortlist`)::

    images.regions.npy     (n, R, d) region embeddings, float16 or float32, memory-mapped at search time
    images.global.npy      (n, D) float32 shortlist vectors (l2-normalised)
    images.faiss           FAISS inner-product index of them (flat, hnsw or ivf)
    captions.words.npy     (W, d) word embeddings of all captions, one row per word, captions back to back
    captions.offsets.npy   (m + 1,) int64: caption j is rows offsets[j]:offsets[j + 1]
    captions.global.npy    (m, D) float32, captions.faiss, captions.txt        (splits with captions only)
    {data_name}_vocab.json the vocabulary of the text queries
    manifest.json          checkpoint SHA-256, options, sizes and versions -- written last

A search encodes the query, takes the shortlist (top ``shortlist`` gallery items by cosine from
FAISS), scores only those with the exact model (:meth:`vsl.models.similarity.SimilarityEncoder.score_pairs`)
and returns the best ``k`` by exact score; ``shortlist=0`` scores the whole gallery exactly.

Builds run in blocks of :data:`BLOCK_IMAGES` images (:data:`BLOCK_CAPTIONS` captions); each finished
block is recorded in a progress file, so that an interrupted build, run again with the same options,
resumes at the first unfinished block. Under torchrun every process encodes its own contiguous run
of blocks into the shared files and rank 0 builds the FAISS indexes and the manifest.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..config import INDEX_DTYPES, INDEX_TYPES
from ..errors import CheckpointError, ConfigError, DataError
from ..fileio import atomic_write, atomic_write_text, check_writable
from ..logs import progress_bar
from ..runtime import pad_token_ids, padded_words, require_shortlist  # noqa: F401  (padded_words re-exported)
from .gallery import feature_gallery, split_gallery

PathLike = Union[str, os.PathLike]
INDEX_FORMAT = "vsl-index-1"
MANIFEST = "manifest.json"
BLOCK_IMAGES = 1024
BLOCK_CAPTIONS = 4096
#: HNSW graph degree and build/search depth; IVF lists per sqrt(n) and probes (recall ~0.99 at K=100
#: on the demo gallery, see the README's retrieval section).
HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH = 32, 80, 256
IVF_LISTS_PER_SQRT_N, IVF_NPROBE = 4, 32
#: Images whose regions are scored at once in exhaustive search (bounds the float32 copy).
EXHAUSTIVE_BLOCK = 2048

FILES = {
    "regions": "images.regions.npy", "image_global": "images.global.npy", "image_faiss": "images.faiss",
    "words": "captions.words.npy", "offsets": "captions.offsets.npy", "caption_global": "captions.global.npy",
    "caption_faiss": "captions.faiss", "captions": "captions.txt",
}


def sha256_file(path: PathLike, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# FAISS
# --------------------------------------------------------------------------------------------
def make_faiss(vectors: np.ndarray, index_type: str, seed: int = 0):
    """An inner-product FAISS index of ``vectors (n, D)`` float32: exact ``flat``, graph ``hnsw``, or ``ivf``."""
    import faiss

    n, dim = vectors.shape
    if index_type == "flat":
        index = faiss.IndexFlatIP(dim)
    elif index_type == "hnsw":
        index = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    elif index_type == "ivf":
        lists = max(1, min(n // 39, int(IVF_LISTS_PER_SQRT_N * np.sqrt(n))))   # FAISS wants >= 39 points per list
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
        sample = vectors
        if n > 256 * lists:
            sample = vectors[np.sort(np.random.default_rng(seed).choice(n, 256 * lists, replace=False))]
        index.train(np.ascontiguousarray(sample, dtype=np.float32))
    else:
        raise ConfigError(f"index type must be one of {INDEX_TYPES}, got {index_type!r}")
    for lo in range(0, n, 65536):
        index.add(np.ascontiguousarray(vectors[lo:lo + 65536], dtype=np.float32))
    return index


def write_faiss(path: Path, index) -> None:
    import faiss

    atomic_write(path, lambda fh: fh.write(faiss.serialize_index(index).tobytes()))


def read_faiss(path: Path):
    import faiss

    try:
        return faiss.read_index(str(path))
    except RuntimeError as exc:
        raise DataError(f"{path}: not a readable FAISS index ({str(exc).strip().splitlines()[-1]})") from None


def tune_faiss(index, shortlist: int) -> None:
    """Search depth of approximate indexes for a shortlist of ``shortlist`` items."""
    import faiss

    if isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = max(HNSW_EF_SEARCH, 2 * shortlist)
    elif isinstance(index, faiss.IndexIVF):
        index.nprobe = min(index.nlist, IVF_NPROBE)


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------
def _block_range(num_blocks: int, distributed) -> range:
    """This process's contiguous run of blocks (all of them without torchrun)."""
    if distributed is None or distributed.world_size == 1:
        return range(num_blocks)
    r, w = distributed.rank, distributed.world_size
    return range(num_blocks * r // w, num_blocks * (r + 1) // w)


class _Progress:
    """Finished blocks of one side ("images"/"captions"), one JSON file per process, for resume."""

    def __init__(self, out: Path, side: str, options: Dict[str, Any], rank: int):
        self.out, self.side, self.options, self.rank = out, side, options, rank
        self.path = out / f"progress-{side}-r{rank}.json"
        self.done: List[int] = []

    def finished(self) -> set:
        """Blocks recorded by any process of a build with the same options."""
        done = set()
        for path in self.out.glob(f"progress-{self.side}-r*.json"):
            try:
                state = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if state.get("options") == self.options:
                done.update(int(b) for b in state.get("blocks", []))
                if path == self.path:
                    self.done = [int(b) for b in state.get("blocks", [])]
        return done

    def mark(self, block: int) -> None:
        self.done.append(block)
        atomic_write_text(self.path, json.dumps({"options": self.options, "blocks": self.done}))


def _write_blocks(side: str, total: int, block: int, batch_size: int, write: Callable[[int, int], None],
                  arrays: Sequence[np.ndarray], progress: "_Progress", done: set, distributed, show: bool) -> None:
    """Fill this process's unfinished blocks of ``total`` items (``block`` each), ``write(i, j)``
    writing rows ``i:j`` of ``arrays`` ``batch_size`` at a time; a block is marked finished only
    after ``arrays`` are flushed, so a resumed build never trusts rows that did not reach the disk."""
    blocks = [b for b in _block_range(-(-total // block), distributed) if b not in done]
    bar = progress_bar(total, f"index {side}", enabled=show, unit=side[:3], unit_scale=True,
                       initial=min(total, len(done) * block))
    for b in blocks:
        lo, hi = b * block, min(total, (b + 1) * block)
        for i in range(lo, hi, batch_size):
            j = min(hi, i + batch_size)
            write(i, j)
            bar.update(j - i)
        for array in arrays:
            array.flush()
        progress.mark(b)
    bar.close()


def _open_array(path: Path, shape: Tuple[int, ...], dtype, fresh: bool) -> np.ndarray:
    """A writable ``.npy`` memmap: created (sparse) when ``fresh``, else reopened after checking its header."""
    if not fresh and path.is_file():
        try:
            array = np.lib.format.open_memmap(path, mode="r+")
            if array.shape == tuple(shape) and array.dtype == np.dtype(dtype):
                return array
        except (ValueError, OSError):
            pass
    return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=tuple(shape))


@torch.inference_mode()
def build_index(checkpoint: PathLike, data_path: Optional[PathLike] = None, split: str = "test",
                out: PathLike = "index", *, data_name: Optional[str] = None, vocab_path: Optional[PathLike] = None,
                features: Optional[PathLike] = None, dtype: str = "float16", index_type: str = "flat",
                batch_size: int = 128, device: str = "auto", progress: bool = True, distributed=None,
                block_images: int = BLOCK_IMAGES, block_captions: int = BLOCK_CAPTIONS) -> Path:
    """Encode a split (or a pure image gallery: ``features``, a folder of ``.npy`` files) into ``out``.

    ``checkpoint`` must have a shortlist head. Returns the index folder. ``distributed`` (a
    :class:`vsl.distributed.DistInfo` under torchrun): each process encodes its run of blocks.
    Running the same command again after an interruption resumes at the first unfinished block;
    an index already complete for the same checkpoint and options is left as it is.
    """
    from ..device import resolve_device
    from ..runtime import load_for_use

    if dtype not in INDEX_DTYPES:
        raise ConfigError(f"index dtype must be one of {INDEX_DTYPES}, got {dtype!r}")
    if index_type not in INDEX_TYPES:
        raise ConfigError(f"index type must be one of {INDEX_TYPES}, got {index_type!r}")
    if batch_size < 1 or block_images < 1 or block_captions < 1:
        raise ConfigError(f"batch and block sizes must be positive, got {batch_size}, {block_images}, {block_captions}")
    rank = distributed.rank if distributed is not None else 0
    is_main = rank == 0
    out = Path(out)
    check_writable(out, "folder")
    dev = distributed.device if distributed is not None else resolve_device(device)
    loaded = load_for_use(checkpoint, dev, vocab_path, data_name, shortlist=True)
    model, config = loaded.model, loaded.config
    if features is not None:
        gallery = feature_gallery(features)
        for name, have in (("img_dim", gallery.img_dim), ("num_regions", gallery.num_regions)):
            if getattr(config, name) != have:
                raise CheckpointError(f"{checkpoint}: the model expects {name} {getattr(config, name)}, "
                                      f"the features in {features} have {have}")
        source = {"features": [str(Path(s).resolve()) for s in gallery.sources]}
    else:
        data_path = data_path if data_path is not None else config.data_path
        gallery = split_gallery(loaded.open_split(data_path, split).dataset)
        source = {"data_path": str(Path(data_path).resolve()), "split": split, "data_name": config.data_name}
    n, m = gallery.num_images, len(gallery.captions)
    d, dim = config.embed_size, config.shortlist_dim
    tokens = [loaded.vocab.encode(c) for c in gallery.captions]
    lengths = np.array([len(t) for t in tokens], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    options = {"format": INDEX_FORMAT, "checkpoint_sha256": sha256_file(checkpoint), "dtype": dtype,
               "index_type": index_type, "num_images": n, "num_captions": m, "embed_size": d,
               "shortlist_dim": dim, "num_regions": gallery.num_regions, "block_images": block_images,
               "block_captions": block_captions, **source}

    manifest_path = out / MANIFEST
    if manifest_path.is_file():
        try:
            if json.loads(manifest_path.read_text()).get("options") == options:
                return out                                         # complete and up to date
        except (OSError, json.JSONDecodeError):
            pass
        if is_main:
            manifest_path.unlink()          # the old index is being replaced: never leave a stale manifest
    _barrier(distributed)
    img_progress = _Progress(out, "images", options, rank)
    cap_progress = _Progress(out, "captions", options, rank)
    img_done, cap_done = img_progress.finished(), cap_progress.finished()
    fresh = not img_done and not cap_done
    store = np.float16 if dtype == "float16" else np.float32
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        _open_array(out / FILES["regions"], (n, gallery.num_regions, d), store, fresh)
        _open_array(out / FILES["image_global"], (n, dim), np.float32, fresh)
        if m:
            _open_array(out / FILES["words"], (int(offsets[-1]), d), store, fresh)
            _open_array(out / FILES["caption_global"], (m, dim), np.float32, fresh)
    _barrier(distributed)
    show = progress and is_main

    # Images: region embeddings and global vectors, block by block.
    regions = np.lib.format.open_memmap(out / FILES["regions"], mode="r+")
    img_global = np.lib.format.open_memmap(out / FILES["image_global"], mode="r+")

    def write_images(i: int, j: int) -> None:
        emb = model.encode_images(torch.from_numpy(gallery.read(i, j)).to(dev))          # (b, R, d)
        regions[i:j] = emb.cpu().numpy().astype(store)
        img_global[i:j] = model.shortlist.images(emb).cpu().numpy()

    _write_blocks("images", n, block_images, batch_size, write_images, (regions, img_global), img_progress,
                  img_done, distributed, show)
    del regions, img_global

    # Captions: word embeddings back to back, and global vectors.
    if m:
        ids, lens = pad_token_ids(tokens)
        words = np.lib.format.open_memmap(out / FILES["words"], mode="r+")
        cap_global = np.lib.format.open_memmap(out / FILES["caption_global"], mode="r+")

        def write_captions(i: int, j: int) -> None:
            batch_lens = lens[i:j]
            emb = model.encode_captions(ids[i:j, :int(batch_lens.max())].to(dev), batch_lens)   # (b, L, d)
            mask = torch.arange(emb.size(1)) < batch_lens.unsqueeze(1)
            words[offsets[i]:offsets[j]] = emb.cpu()[mask].numpy().astype(store)   # row-major = caption order
            cap_global[i:j] = model.shortlist.captions(emb, batch_lens.to(dev)).cpu().numpy()

        _write_blocks("captions", m, block_captions, batch_size, write_captions, (words, cap_global), cap_progress,
                      cap_done, distributed, show)
        del words, cap_global
    _barrier(distributed)

    if is_main:
        files = [FILES["regions"], FILES["image_global"], FILES["image_faiss"]]
        write_faiss(out / FILES["image_faiss"], make_faiss(np.load(out / FILES["image_global"], mmap_mode="r"),
                                                           index_type))
        if m:
            write_faiss(out / FILES["caption_faiss"],
                        make_faiss(np.load(out / FILES["caption_global"], mmap_mode="r"), index_type))
            atomic_write(out / FILES["offsets"], lambda fh: np.save(fh, offsets))
            atomic_write_text(out / FILES["captions"], "".join(c + "\n" for c in gallery.captions))
            files += [FILES[k] for k in ("words", "offsets", "caption_global", "caption_faiss", "captions")]
        vocab_name = f"{config.data_name}_vocab.json"
        vocab_json = json.dumps({"word2idx": loaded.vocab.word2idx,
                                 "idx2word": {str(k): v for k, v in loaded.vocab.idx2word.items()},
                                 "idx": len(loaded.vocab)})
        atomic_write_text(out / vocab_name, vocab_json)
        files.append(vocab_name)
        manifest = {
            "format": INDEX_FORMAT, "options": options, "versions": _versions(),
            "checkpoint": str(Path(checkpoint).resolve()), "checkpoint_sha256": options["checkpoint_sha256"],
            "model": config.module_name, "data_name": config.data_name, "split": source.get("split"),
            "num_images": n, "num_captions": m, "captions_per_image": gallery.captions_per_image,
            "num_regions": gallery.num_regions, "embed_size": d, "shortlist_dim": dim, "dtype": dtype,
            "index_type": index_type, "bytes_per_image": _bytes_per_image(out, files, n),
            "files": {f: (out / f).stat().st_size for f in files}, "created": time.time(),
        }
        atomic_write_text(manifest_path, json.dumps(manifest, indent=2) + "\n")     # last: the index is complete
        for path in out.glob("progress-*.json"):
            path.unlink(missing_ok=True)
    _barrier(distributed)
    return out


def _bytes_per_image(out: Path, files: Sequence[str], n: int) -> float:
    image_files = [f for f in files if f.startswith("images.")]
    return sum((out / f).stat().st_size for f in image_files) / max(1, n)


def _versions() -> Dict[str, str]:
    import faiss

    from .. import __version__
    return {"vsl": __version__, "torch": torch.__version__, "numpy": np.__version__, "faiss": faiss.__version__}


def _barrier(distributed) -> None:
    if distributed is not None and distributed.world_size > 1:
        import torch.distributed as dist
        dist.barrier(group=distributed.group)


# --------------------------------------------------------------------------------------------
# Searching
# --------------------------------------------------------------------------------------------
@dataclass
class SearchHit:
    """One result: ``id`` is an image index (text queries) or a caption index (image queries)."""

    rank: int
    id: int
    score: float
    shortlist_score: float
    captions: List[str] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        return {"rank": self.rank, "id": self.id, "score": self.score, "shortlist_score": self.shortlist_score,
                "captions": list(self.captions)}


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
        self.regions = np.load(path / FILES["regions"], mmap_mode="r")
        self.image_global = np.load(path / FILES["image_global"], mmap_mode="r")
        self.image_faiss = read_faiss(path / FILES["image_faiss"])
        self.captions: List[str] = []
        if self.num_captions:
            self.words = np.load(path / FILES["words"], mmap_mode="r")
            self.offsets = np.load(path / FILES["offsets"])
            self.caption_global = np.load(path / FILES["caption_global"], mmap_mode="r")
            self.caption_faiss = read_faiss(path / FILES["caption_faiss"])
            self.captions = (path / FILES["captions"]).read_text(encoding="utf-8").split("\n")[:self.num_captions]
        self._check_shapes()

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
        return cls(path, manifest, loaded.model, loaded.vocab, dev)

    def _check_shapes(self) -> None:
        m = self.manifest
        expect = {FILES["regions"]: (self.regions.shape, (self.num_images, m["num_regions"], m["embed_size"])),
                  FILES["image_global"]: (self.image_global.shape, (self.num_images, m["shortlist_dim"]))}
        for name, (have, want) in expect.items():
            if tuple(have) != tuple(want):
                raise DataError(f"{self.path / name}: shape {tuple(have)}, expected {tuple(want)} (rebuild the index)")
        if self.image_faiss.ntotal != self.num_images:
            raise DataError(f"{self.path / FILES['image_faiss']}: {self.image_faiss.ntotal} vectors, "
                            f"expected {self.num_images} (rebuild the index)")

    def info(self) -> Dict[str, Any]:
        m = self.manifest
        return {"model": m["model"], "checkpoint": m["checkpoint"], "checkpoint_sha256": m["checkpoint_sha256"],
                "num_images": self.num_images, "num_captions": self.num_captions, "index_type": m["index_type"],
                "dtype": m["dtype"], "split": m.get("split"), "data_name": m["data_name"],
                "vsl_version": m["versions"]["vsl"]}

    def captions_of_image(self, image_id: int) -> List[str]:
        """The split's captions of image ``image_id`` ([] for a pure image gallery)."""
        self._check_image_id(image_id)
        cpi = self.captions_per_image
        return self.captions[cpi * image_id:cpi * (image_id + 1)] if cpi else []

    # -- checks -------------------------------------------------------------------------------
    def _check_image_id(self, image_id) -> int:
        if isinstance(image_id, bool) or not isinstance(image_id, (int, np.integer)):
            raise ConfigError(f"image id {image_id!r} is not an integer (expected 0..{self.num_images - 1})")
        if not 0 <= int(image_id) < self.num_images:
            raise ConfigError(f"image id {image_id} out of range: the index has {self.num_images} images "
                              f"(ids 0..{self.num_images - 1})")
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
        k, shortlist = self._sizes(k, shortlist, self.num_images)
        unknown = [[w for w in tokenize(q) if w not in self.vocab] for q in queries]
        ids, lengths = pad_token_ids([self.vocab.encode(q) for q in queries])
        cap_emb = self.model.encode_captions(ids.to(self.device), lengths)             # (Q, L, d)
        cap_vec = self.model.shortlist.captions(cap_emb, lengths.to(self.device)).float()   # (Q, D)
        Q = len(queries)
        if shortlist:
            tune_faiss(self.image_faiss, shortlist)
            cos, cand = self.image_faiss.search(np.ascontiguousarray(cap_vec.cpu().numpy()), shortlist)   # (Q, S)
            uniq, inverse = np.unique(np.where(cand < 0, 0, cand), return_inverse=True)
            img_emb = self._regions(uniq)
            exact = self.model.sim_enc.score_pairs(
                img_emb, cap_emb, lengths, torch.from_numpy(inverse.reshape(-1)),
                torch.arange(Q).repeat_interleave(shortlist)).view(Q, shortlist).float().cpu()
            exact[torch.from_numpy(cand < 0)] = float("-inf")            # approximate indexes may return fewer
            order = torch.argsort(exact, dim=1, descending=True, stable=True)[:, :k]
            hit_ids = np.take_along_axis(cand, order.numpy(), 1)
            hit_scores = torch.gather(exact, 1, order).numpy()
            hit_cos = np.take_along_axis(cos, order.numpy(), 1)
        else:
            exact = self._exhaustive_images(cap_emb, lengths)             # (Q, n)
            top = torch.topk(exact, k, dim=1)
            hit_ids, hit_scores = top.indices.numpy(), top.values.numpy()
            hit_cos = np.einsum("qkd,qd->qk", self.image_global[hit_ids.reshape(-1)].reshape(Q, k, -1),
                                cap_vec.cpu().numpy())
        seconds = time.perf_counter() - start
        return [SearchResult(query=q, unknown_words=unknown[i], k=k, shortlist=shortlist, seconds=seconds,
                             hits=[SearchHit(rank=r + 1, id=int(hit_ids[i, r]), score=float(hit_scores[i, r]),
                                             shortlist_score=float(hit_cos[i, r]),
                                             captions=self.captions_of_image(int(hit_ids[i, r])))
                                   for r in range(hit_ids.shape[1]) if hit_ids[i, r] >= 0])
                for i, q in enumerate(queries)]

    def _regions(self, image_ids: np.ndarray) -> torch.Tensor:
        """Region embeddings of ``image_ids`` (sorted) as float32 ``(len, R, d)`` on the device."""
        return torch.from_numpy(np.asarray(self.regions[image_ids], dtype=np.float32)).to(self.device)

    def _exhaustive_images(self, cap_emb: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        rows = [self.model.similarity(self._regions(np.arange(i, min(self.num_images, i + EXHAUSTIVE_BLOCK))),
                                      cap_emb, lengths).float().cpu()
                for i in range(0, self.num_images, EXHAUSTIVE_BLOCK)]
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
        k, shortlist = self._sizes(k, shortlist, self.num_captions)
        Q = len(ids)
        img_emb = torch.from_numpy(np.asarray(self.regions[ids], dtype=np.float32)).to(self.device)   # (Q, R, d)
        img_vec = np.asarray(self.image_global[ids], dtype=np.float32)
        if shortlist:
            tune_faiss(self.caption_faiss, shortlist)
            cos, cand = self.caption_faiss.search(np.ascontiguousarray(img_vec), shortlist)
            uniq, inverse = np.unique(np.where(cand < 0, 0, cand), return_inverse=True)
            cap_emb, lengths = self._caption_words(uniq)
            exact = self.model.sim_enc.score_pairs(
                img_emb, cap_emb, lengths, torch.arange(Q).repeat_interleave(shortlist),
                torch.from_numpy(inverse.reshape(-1))).view(Q, shortlist).float().cpu()
            exact[torch.from_numpy(cand < 0)] = float("-inf")
            order = torch.argsort(exact, dim=1, descending=True, stable=True)[:, :k]
            hit_ids = np.take_along_axis(cand, order.numpy(), 1)
            hit_scores = torch.gather(exact, 1, order).numpy()
            hit_cos = np.take_along_axis(cos, order.numpy(), 1)
        else:
            parts = []
            for j in range(0, self.num_captions, EXHAUSTIVE_BLOCK):
                cap_emb, lengths = self._caption_words(np.arange(j, min(self.num_captions, j + EXHAUSTIVE_BLOCK)))
                parts.append(self.model.similarity(img_emb, cap_emb, lengths).float().cpu())
            top = torch.topk(torch.cat(parts, dim=1), k, dim=1)
            hit_ids, hit_scores = top.indices.numpy(), top.values.numpy()
            hit_cos = np.einsum("qkd,qd->qk", self.caption_global[hit_ids.reshape(-1)].reshape(Q, k, -1), img_vec)
        seconds = time.perf_counter() - start
        return [SearchResult(query=int(q), unknown_words=[], k=k, shortlist=shortlist, seconds=seconds,
                             hits=[SearchHit(rank=r + 1, id=int(hit_ids[i, r]), score=float(hit_scores[i, r]),
                                             shortlist_score=float(hit_cos[i, r]),
                                             captions=[self.captions[int(hit_ids[i, r])]])
                                   for r in range(hit_ids.shape[1]) if hit_ids[i, r] >= 0])
                for i, q in enumerate(ids)]

    def _caption_words(self, caption_ids: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
        """Zero-padded word embeddings ``(len, L, d)`` float32 and lengths ``(len,)`` of ``caption_ids``."""
        starts = self.offsets[caption_ids]
        lengths = self.offsets[caption_ids + 1] - starts
        return padded_words(self.words, starts, lengths).to(self.device), torch.from_numpy(lengths)


def read_manifest(path: Path) -> Dict[str, Any]:
    """The manifest of the index folder ``path``, after checking that every listed file has its size."""
    manifest_path = path / MANIFEST
    if not path.is_dir():
        raise DataError(f"{path}: no such index folder (build one with `vsl index`)")
    if not manifest_path.is_file():
        raise DataError(f"{path}: no {MANIFEST}: not a vsl index, or its build did not finish "
                        "(run the same `vsl index` command again to resume it)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{manifest_path}: unreadable index manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != INDEX_FORMAT:
        raise DataError(f"{manifest_path}: not a {INDEX_FORMAT} manifest")
    for name, size in manifest.get("files", {}).items():
        file = path / name
        if not file.is_file():
            raise DataError(f"{file}: missing index file (rebuild the index with `vsl index`)")
        actual = file.stat().st_size
        if actual != size:
            raise DataError(f"{file}: {actual} bytes, expected {size} (truncated or changed; rebuild the index)")
    return manifest
