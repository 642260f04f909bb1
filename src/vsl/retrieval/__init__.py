"""Two-stage retrieval programs: a vector shortlist from the shortlist head, exact re-ranking.

The rooms: :mod:`.store` (an index folder's layout, manifest and resumable blocks),
:mod:`.faiss_index` (the shortlist tier behind FAISS factory strings, per-call search depth),
:mod:`.build` (``vsl index``), :mod:`.index` (:class:`Index`: ``vsl search``, re-ranking with
:func:`vsl.rerank.rerank`), :mod:`.fit` (``vsl fit-shortlist``), :mod:`.gallery` (what is indexed).

* :func:`fit_shortlist`: train a shortlist head on a frozen checkpoint;
* :func:`build_index` / :class:`Index`: a gallery encoded once, searched text -> image and image -> text;
* :func:`add_to_index`, :func:`remove_images`, :func:`compact_index`: a gallery that grows and shrinks
  in generations (:mod:`.append`, :mod:`.grow`, :mod:`.segments`), :class:`IndexBusy` when another
  writer holds it;
* :func:`evaluate_shortlist` (``vsl eval --shortlist K``, :func:`vsl.evaluation.evaluate` with
  two-stage scoring) and :func:`shortlist_recall` (:mod:`vsl.metrics`) are re-exported here.
"""
from ..evaluation import evaluate_shortlist
from ..metrics import REPORT_KS, shortlist_ranks, shortlist_recall
from .append import add_to_index, compact_index
from .build import build_index
from .fit import fit_shortlist
from .index import Index, SearchHit, SearchResult
from .grow import IndexBusy, remove_images
from .store import read_manifest

__all__ = ["fit_shortlist", "Index", "SearchHit", "SearchResult", "build_index", "read_manifest",
           "REPORT_KS", "shortlist_ranks", "shortlist_recall", "evaluate_shortlist", "add_to_index", "compact_index",
           "remove_images", "IndexBusy"]
