"""Two-stage retrieval programs: a vector shortlist from the shortlist head, exact re-ranking.

* :func:`fit_shortlist` (``vsl fit-shortlist``): train a shortlist head on a frozen checkpoint;
* :func:`build_index` / :class:`Index` (``vsl index`` / ``vsl search``): a gallery encoded once,
  searched text -> image and image -> text;
* :func:`evaluate_shortlist` (``vsl eval --shortlist K``): a split's metrics with re-ranking of the
  top K only;
* :func:`shortlist_recall`: how often the true match is in the shortlist.
"""
from .fit import fit_shortlist
from .index import Index, SearchHit, SearchResult, build_index, read_manifest
from .recall import REPORT_KS, shortlist_ranks, shortlist_recall
from .twostage import evaluate_shortlist

__all__ = ["fit_shortlist", "Index", "SearchHit", "SearchResult", "build_index", "read_manifest",
           "REPORT_KS", "shortlist_ranks", "shortlist_recall", "evaluate_shortlist"]
