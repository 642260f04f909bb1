"""The shortlist tier: FAISS inner-product indexes of the shortlist vectors, named by factory strings.

``vsl index --index_type`` takes one of the names of :data:`FACTORY` (``flat`` = exact, ``hnsw`` =
graph, ``ivf`` = inverted lists, each a FAISS factory string) or any FAISS factory string itself
(``"IVF1024,PQ16"``, ``"HNSW64"``, ...). Indexes that need training are trained on a seeded sample.

Search depth is a per-call parameter (:func:`search_parameters`: HNSW's ``efSearch``, IVF's
``nprobe``), never a setting of the shared index, so concurrent searches with different shortlist
sizes do not disturb each other.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from ..errors import ConfigError, DataError
from ..fileio import atomic_write

#: Named index types and their factory strings; ``{lists}`` is filled with :func:`ivf_lists` (n).
FACTORY = {"flat": "Flat", "hnsw": "HNSW32", "ivf": "IVF{lists},Flat"}
INDEX_TYPES = tuple(FACTORY)
#: HNSW build/search depth; IVF lists per sqrt(n) and probes. efSearch 1024: shortlist recall@100
#: against flat 1.000 (text->image) / 0.997 (image->text) on a 1,000,000-image demo-structured gallery,
#: where 256 gave 0.984 / 0.970 (docs/retrieval.md, "A million images on one machine").
HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH = 80, 1024
IVF_LISTS_PER_SQRT_N, IVF_NPROBE = 4, 32
#: Training points per IVF list (FAISS wants >= 39; a larger sample is subsampled to this many).
IVF_MIN_POINTS, IVF_SAMPLE_POINTS = 39, 256
#: Vectors added per call (bounds the float32 copy of a memory-mapped array).
ADD_BLOCK = 65536
#: A refined index re-scores this many times the shortlist from its base index exactly (4 found
#: 0.79-0.83 of flat's top 100 with IVF1024,PQ32x4fs at 100,000 images, 16 0.89-0.99).
REFINE_K_FACTOR = 16


def ivf_lists(n: int) -> int:
    """IVF lists of the ``ivf`` type for ``n`` vectors: ~4 sqrt(n), at least 39 points per list."""
    return max(1, min(n // IVF_MIN_POINTS, int(IVF_LISTS_PER_SQRT_N * np.sqrt(n))))


def factory_string(index_type: str, n: int) -> str:
    """The FAISS factory string of ``index_type`` (a name of :data:`FACTORY` or a factory string)."""
    if not isinstance(index_type, str) or not index_type.strip():
        raise ConfigError(f"index type must be one of {', '.join(INDEX_TYPES)} or a FAISS factory string, "
                          f"got {index_type!r}")
    return FACTORY[index_type].format(lists=ivf_lists(n)) if index_type in FACTORY else index_type


def check_index_type(index_type: str, dim: int = 8) -> None:
    """ConfigError (one line) unless ``index_type`` names an inner-product FAISS index."""
    import faiss

    try:
        faiss.index_factory(dim, factory_string(index_type, 10_000), faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise ConfigError(f"index type {index_type!r}: not one of {', '.join(INDEX_TYPES)} nor a FAISS factory "
                          f"string FAISS accepts ({_reason(exc)})") from None


def make_faiss(vectors: np.ndarray, index_type: str, seed: int = 0, ids: Optional[np.ndarray] = None):
    """An inner-product FAISS index of ``vectors (n, D)`` float32 (a memmap is read in blocks).

    ``ids`` ``(n,)`` int64: the vectors' ids (an id map around the index, as a compacted gallery
    needs); default ``0..n-1``."""
    import faiss

    n, dim = vectors.shape
    check_index_type(index_type, dim)
    index = faiss.index_factory(dim, factory_string(index_type, n), faiss.METRIC_INNER_PRODUCT)
    hnsw = _hnsw(index)
    if hnsw is not None:
        hnsw.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    if not index.is_trained:
        ivf = _ivf(index)
        lists = ivf.nlist if ivf is not None else max(1, n // IVF_SAMPLE_POINTS)
        sample = vectors
        if n > IVF_SAMPLE_POINTS * lists:
            rows = np.random.default_rng(seed).choice(n, IVF_SAMPLE_POINTS * lists, replace=False)
            sample = vectors[np.sort(rows)]
        try:
            index.train(np.ascontiguousarray(sample, dtype=np.float32))
        except RuntimeError as exc:
            raise ConfigError(f"index type {index_type!r}: FAISS cannot train it on {len(sample):,} vectors "
                              f"({_reason(exc)}); choose a smaller index or a larger gallery") from None
    if ids is not None:
        inner, index = index, faiss.IndexIDMap2(index)
        index.own_fields = True
        inner.this.disown()                   # the id map frees its index
    add_vectors(index, vectors, 0 if ids is None else ids)
    return index


def add_vectors(index, vectors: np.ndarray, ids) -> None:
    """Add ``vectors (n, D)`` to ``index`` with ids ``ids`` (an ``(n,)`` int64 array, or the first id of
    consecutive ones); an index without an id map numbers its vectors itself, so it must already hold
    exactly the ids below them."""
    import faiss

    n = len(vectors)
    ids = np.arange(ids, ids + n, dtype=np.int64) if np.isscalar(ids) else np.asarray(ids, dtype=np.int64)
    mapped = isinstance(faiss.downcast_index(index), faiss.IndexIDMap)
    if not mapped and n and ids[0] != index.ntotal:
        raise DataError(f"cannot add ids from {int(ids[0])} to a FAISS index of {index.ntotal} vectors")
    for lo in range(0, n, ADD_BLOCK):
        block = np.ascontiguousarray(vectors[lo:lo + ADD_BLOCK], dtype=np.float32)
        if mapped:
            index.add_with_ids(block, np.ascontiguousarray(ids[lo:lo + ADD_BLOCK]))
        else:
            index.add(block)


def _reason(exc: Exception) -> str:
    """The message of a FAISS error without its C++ location (``Error in ... at file:line: ...``)."""
    text = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    return text.rsplit(": Error: ", 1)[-1].rsplit(": ", 1)[-1] if " at /" in text else text


def _hnsw(index):
    import faiss

    index = faiss.downcast_index(index)
    return index if isinstance(index, faiss.IndexHNSW) else None


def _ivf(index):
    import faiss

    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:                    # not an IVF index
        return None


def _depth(name: str, value, default: int) -> int:
    """A per-call search depth: ``default`` when None, else a positive int (ConfigError otherwise)."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def search_parameters(index, shortlist: int, selector=None, *, ef_search: Optional[int] = None,
                      nprobe: Optional[int] = None, k_factor: Optional[int] = None):
    """Per-call FAISS search parameters for a shortlist of ``shortlist`` items (None: nothing to tune);
    ``selector`` (a FAISS IDSelector) restricts the search to the ids it accepts.

    ``ef_search`` (HNSW; at least ``2 * shortlist`` is used), ``nprobe`` (IVF; at most its lists) and
    ``k_factor`` (refined indexes: the base proposes ``k_factor * shortlist`` candidates that are
    re-scored exactly) override the defaults :data:`HNSW_EF_SEARCH`, :data:`IVF_NPROBE` and
    :data:`REFINE_K_FACTOR` for this call only; an option the index does not have is ignored.

    A refined index (factory ``...,RFlat``) takes refine parameters wrapping its base index's (FAISS
    refuses the base's parameters given to it directly); the selector goes to the base, which
    proposes the candidates the refinement re-scores."""
    import faiss

    ef_search = _depth("ef_search", ef_search, HNSW_EF_SEARCH)
    nprobe = _depth("nprobe", nprobe, IVF_NPROBE)
    k_factor = _depth("k_factor", k_factor, REFINE_K_FACTOR)
    refine = faiss.downcast_index(index)
    if isinstance(refine, faiss.IndexIDMap):
        inner = faiss.downcast_index(refine.index)
        if selector is not None and isinstance(inner, faiss.IndexRefine):
            # The id map translates only a top-level selector, and a refined index hands its base
            # the base's own parameters: translate rows to ids for the base here.
            translated = faiss.IDSelectorTranslated(refine.id_map, selector)
            translated.ids = selector               # keep the wrapped selector alive as long
            selector = translated
        # Its search hands the inner index the same parameters (a top-level selector translated).
        return search_parameters(inner, shortlist, selector, ef_search=ef_search, nprobe=nprobe,
                                 k_factor=k_factor)
    if isinstance(refine, faiss.IndexRefine):
        base = search_parameters(refine.base_index, shortlist, selector, ef_search=ef_search, nprobe=nprobe)
        extra = {} if base is None else {"base_index_params": base}
        return faiss.IndexRefineSearchParameters(k_factor=k_factor, **extra)
    extra = {} if selector is None else {"sel": selector}
    if _hnsw(index) is not None:
        return faiss.SearchParametersHNSW(efSearch=max(ef_search, 2 * shortlist), **extra)
    ivf = _ivf(index)
    if ivf is not None:
        return faiss.SearchParametersIVF(nprobe=min(ivf.nlist, nprobe), **extra)
    return faiss.SearchParameters(**extra) if extra else None


def excluding(ids: np.ndarray):
    """A FAISS selector of every id except the sorted int64 ``ids`` (None when there are none)."""
    import faiss

    if len(ids) == 0:
        return None
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    inner = faiss.IDSelectorBatch(len(ids), faiss.swig_ptr(ids))      # copies the ids
    selector = faiss.IDSelectorNot(inner)
    selector.inner = inner                   # IDSelectorNot does not own it: keep it alive as long
    return selector


def search(index, queries: np.ndarray, shortlist: int, selector=None, **depth) -> Tuple[np.ndarray, np.ndarray]:
    """The top ``shortlist`` items of each query ``(Q, D)``: ``(scores (Q, S) float32, ids (Q, S) int64)``,
    id -1 where an approximate index found fewer; ``selector`` (:func:`excluding`) hides ids;
    ``depth``: ``ef_search`` / ``nprobe`` / ``k_factor`` of this call (:func:`search_parameters`)."""
    params = search_parameters(index, shortlist, selector, **depth)
    x = np.ascontiguousarray(queries, dtype=np.float32)
    return index.search(x, shortlist) if params is None else index.search(x, shortlist, params=params)


def write_faiss(path: Path, index) -> None:
    import faiss

    atomic_write(path, lambda fh: fh.write(faiss.serialize_index(index).tobytes()))


def read_faiss(path: Path):
    import faiss

    try:
        return faiss.read_index(str(path))
    except RuntimeError as exc:
        raise DataError(f"{path}: not a readable FAISS index ({str(exc).strip().splitlines()[-1]})") from None

