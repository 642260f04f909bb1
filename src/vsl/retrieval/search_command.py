"""``vsl search``: options and output of :meth:`vsl.retrieval.Index.search_text` / ``search_image``.

``--json`` prints one JSON object per query (:meth:`vsl.retrieval.SearchResult.to_dict`), one a line.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List

from ..errors import ConfigError, DataError


DESCRIPTION = """\
Search an index: text -> images (--text, or --queries FILE with one query per line, batched) or
image -> captions (--image_id). The top --shortlist items by shortlist vector are re-ranked by the
exact model (--shortlist 0: the whole gallery exactly). A result's score is exact + lambda * shortlist
cosine, lambda the head's fusion weight (vsl fit-shortlist --fit_fusion; 0 = the exact score):

  vsl search --index index/ --text "a man riding a horse" --k 10 --shortlist 100
  vsl search --index index/ --image_id 17 --json
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", required=True, default=argparse.SUPPRESS, help="index folder of vsl index (required)")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", help="a text query (text -> images) (default: none)")
    what.add_argument("--queries", metavar="FILE", help="a file of text queries, one per line (default: none)")
    what.add_argument("--image_id", type=int, help="a gallery image (image -> captions) (default: none)")
    parser.add_argument("--k", type=int, default=10, help="results per query")
    parser.add_argument("--shortlist", type=int, default=100,
                        help="candidates re-ranked by the exact model; 0 = exhaustive exact scoring")
    parser.add_argument("--fusion", type=float, default=None, metavar="LAMBDA",
                        help="weight of the shortlist cosine in the score, exact + LAMBDA * cosine (default: the "
                             "checkpoint's, from vsl fit-shortlist --fit_fusion; 0 = exact scores)")
    parser.add_argument("--json", action="store_true", help="one JSON object per query on standard output (default: off)")
    parser.add_argument("--checkpoint", default=None, help="the index's checkpoint (default: the path in its manifest)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")


def run(args: argparse.Namespace) -> int:
    from .index import Index

    queries = _read_queries(args.queries) if args.queries else None
    if args.fusion is not None:
        from ..rerank import check_fusion

        check_fusion(args.fusion, "--fusion")
    index = Index.load(args.index, device=args.device, checkpoint=args.checkpoint)
    if args.fusion is not None:
        index.fusion = float(args.fusion)
    if args.image_id is not None:
        results = index.search_image([args.image_id], k=args.k, shortlist=args.shortlist)
        gallery = index.num_captions
    else:
        results = index.search_text(queries or [args.text], k=args.k, shortlist=args.shortlist)
        gallery = index.num_images
    first = results[0]
    if first.k < args.k or (args.shortlist and first.shortlist != args.shortlist):
        print(f"vsl: note: k {args.k} / shortlist {args.shortlist} clamped to k {first.k} / shortlist "
              f"{first.shortlist} (gallery of {gallery:,})", file=sys.stderr)
    for result in results:
        if result.unknown_words:
            print(f"vsl: warning: query {result.query!r}: unknown words {', '.join(result.unknown_words)} "
                  "(not in the vocabulary; searched without them)", file=sys.stderr)
        if args.json:
            print(json.dumps(result.to_dict()))
        else:
            print(format_result(result, "image" if args.image_id is None else "caption"))
    return 0


def _read_queries(path: str) -> List[str]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the queries file ({exc}); expected UTF-8 text, one query per line") from None
    queries = [line.strip() for line in lines if line.strip()]
    if not queries:
        raise ConfigError(f"{path}: no queries (expected one query per line)")
    return queries


def format_result(result, kind: str) -> str:
    lines = [f"query {result.query!r}: top {result.k} {kind}s of a shortlist of "
             f"{result.shortlist or 'all (exhaustive)'} ({1000 * result.seconds:.0f} ms)",
             f"  {'rank':>4}  {kind + ' id':>10}  {'score':>7}  {'exact':>7}  {'shortlist':>9}  captions"]
    for hit in result.hits:
        text = " | ".join(hit.captions)
        exact = hit.score if hit.exact_score is None else hit.exact_score
        lines.append(f"  {hit.rank:>4}  {hit.id:>10}  {hit.score:7.4f}  {exact:7.4f}  {hit.shortlist_score:9.4f}  "
                     f"{text}")
    return "\n".join(lines)
