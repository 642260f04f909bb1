"""Options and output of ``vsl fit-shortlist``, ``vsl index`` and ``vsl search`` (the CLI registers them).

Each ``run_*`` makes one library call (:func:`vsl.retrieval.fit_shortlist`,
:func:`vsl.retrieval.build_index`, :meth:`vsl.retrieval.Index.search_text` /
:meth:`~vsl.retrieval.Index.search_image`) and prints its result; errors are
:class:`vsl.errors.VSLError` lines, reported by :func:`vsl.cli.main` with exit status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List

from ..config import INDEX_DTYPES, INDEX_TYPES, SHORTLIST_LOSSES, Config
from ..errors import ConfigError, DataError
from .fit import MAX_MEMORY_GB
from .index import BLOCK_IMAGES

_DEFAULTS = Config.__dataclass_fields__


def _default(name: str):
    return _DEFAULTS[name].default


# --------------------------------------------------------------------------------------------
# vsl fit-shortlist
# --------------------------------------------------------------------------------------------
FIT_DESCRIPTION = """\
Fit a shortlist head (one global vector per image and caption, for two-stage search) on the training
split of a frozen checkpoint -- published or vsl format -- and write a checkpoint that holds the
original weights unchanged plus the head:

  vsl fit-shortlist --checkpoint SGR+VSL_COCO.pth.tar --data_path DATA --vocab_path VOCAB --out SGR_sl.pth.tar
"""


def add_fit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, default=argparse.SUPPRESS, help="frozen checkpoint (required)")
    parser.add_argument("--out", required=True, default=argparse.SUPPRESS, help="checkpoint to write, with the head (required)")
    parser.add_argument("--data_path", default=None, help="data folder (default: the checkpoint's)")
    parser.add_argument("--vocab_path", default=None, help="vocabulary folder (default: the checkpoint's)")
    parser.add_argument("--data_name", default=None, help="dataset name (default: the checkpoint's)")
    parser.add_argument("--shortlist_dim", type=int, default=None,
                        help="size of the global vectors (default: the checkpoint's, else 256)")
    parser.add_argument("--shortlist_hidden", type=int, default=None,
                        help="width of the head's per-region / per-word ReLU layer; 0 = the linear head on mean "
                             f"embeddings (default: the checkpoint's, else {_default('shortlist_hidden')})")
    parser.add_argument("--shortlist_loss", choices=SHORTLIST_LOSSES, default=None,
                        help=f"the head's loss (default: {_default('shortlist_loss')})")
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"epochs over the frozen embeddings (default: {_default('shortlist_epochs')})")
    parser.add_argument("--batch_size", type=int, default=None,
                        help=f"captions per step (default: {_default('shortlist_batch_size')})")
    parser.add_argument("--learning_rate", type=float, default=None,
                        help=f"Adam learning rate (default: {_default('shortlist_learning_rate')})")
    parser.add_argument("--max_memory_gb", type=float, default=MAX_MEMORY_GB,
                        help="memory for the frozen training embeddings; beyond it a random subset of the training "
                             "images is used (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the head's initialisation and batches")
    parser.add_argument("--device", default="auto", help="auto = cuda if available, else cpu")
    parser.add_argument("--quiet", action="store_true", help="no progress bars (default: off)")


def run_fit(args: argparse.Namespace) -> int:
    from .fit import fit_shortlist

    result = fit_shortlist(args.checkpoint, args.data_path, args.out, vocab_path=args.vocab_path,
                           data_name=args.data_name, device=args.device, dim=args.shortlist_dim,
                           hidden=args.shortlist_hidden, loss=args.shortlist_loss, epochs=args.epochs,
                           batch_size=args.batch_size, learning_rate=args.learning_rate, seed=args.seed,
                           max_memory_gb=args.max_memory_gb, progress=not args.quiet)
    kind = (f"{result['config']['shortlist_hidden']}-unit" if result["config"]["shortlist_hidden"] else "linear")
    print(f"fitted a {result['config']['shortlist_dim']}-d {kind} shortlist head ({result['config']['shortlist_loss']}, "
          f"{len(result['loss_history'])} epochs, final loss {result['loss_history'][-1]:.4f}) in "
          f"{result['seconds']:.1f} s")
    if result["recall"]:
        print(format_recall(result["recall"], "dev"))
    print(f"wrote {result['out']}")
    return 0


def format_recall(recall, split: str) -> str:
    ks = list(recall["i2t"])
    lines = [f"shortlist recall on {split} (% of queries whose match is in the top K):",
             "  K       " + "".join(f"{k:>8}" for k in ks)]
    for direction in ("i2t", "t2i"):
        lines.append(f"  {direction}     " + "".join(f"{recall[direction][k]:8.1f}" for k in ks))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# vsl index
# --------------------------------------------------------------------------------------------
INDEX_DESCRIPTION = """\
Encode a split (or a folder of .npy region features: a pure image gallery) once into an index folder:
region embeddings (memory-mapped), shortlist vectors, FAISS indexes and a manifest (written last):

  vsl index --checkpoint SGR_sl.pth.tar --data_path DATA --split test --out index/
  vsl index --checkpoint SGR_sl.pth.tar --features FEATURES/ --out gallery/ --index_type hnsw

The checkpoint needs a shortlist head (vsl fit-shortlist). An interrupted build resumes when the same
command runs again; under torchrun each process encodes its own blocks.
"""


def add_index_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, default=argparse.SUPPRESS, help="checkpoint with a shortlist head (required)")
    parser.add_argument("--out", required=True, default=argparse.SUPPRESS, help="index folder (required)")
    parser.add_argument("--data_path", default=None, help="data folder (default: the checkpoint's)")
    parser.add_argument("--split", default="test", help="split to index")
    parser.add_argument("--features", default=None,
                        help="a folder of N x regions x dim .npy files (or one file) to index instead of a "
                             "split: a pure image gallery without captions (default: none)")
    parser.add_argument("--vocab_path", default=None, help="vocabulary folder (default: the checkpoint's)")
    parser.add_argument("--data_name", default=None, help="dataset name (default: the checkpoint's)")
    parser.add_argument("--dtype", choices=INDEX_DTYPES, default="float16", help="storage of the embeddings")
    parser.add_argument("--index_type", choices=INDEX_TYPES, default="flat",
                        help="FAISS index: flat = exact inner product; hnsw / ivf = approximate, for large galleries")
    parser.add_argument("--batch_size", type=int, default=128, help="images/captions per encoding batch")
    parser.add_argument("--block_images", type=int, default=BLOCK_IMAGES,
                        help="images per resumable block (and per torchrun share unit)")
    parser.add_argument("--device", default="auto", help="auto = cuda if available, else cpu")
    parser.add_argument("--quiet", action="store_true", help="no progress bars (default: off)")


def run_index(args: argparse.Namespace) -> int:
    from ..distributed import cleanup, launched_by_torchrun, setup_distributed
    from .index import build_index, read_manifest

    info = setup_distributed(args.device) if launched_by_torchrun() else None
    try:
        out = build_index(args.checkpoint, args.data_path, args.split, args.out, data_name=args.data_name,
                          vocab_path=args.vocab_path, features=args.features, dtype=args.dtype,
                          index_type=args.index_type, batch_size=args.batch_size, device=args.device,
                          progress=not args.quiet, distributed=info, block_images=args.block_images)
    finally:
        if info is not None:
            cleanup()
    if info is None or info.is_main:
        m = read_manifest(Path(out))
        print(f"index {out}: {m['num_images']:,} images, {m['num_captions']:,} captions, {m['index_type']} "
              f"{m['dtype']}, {m['bytes_per_image']:,.0f} bytes per image")
    return 0


# --------------------------------------------------------------------------------------------
# vsl search
# --------------------------------------------------------------------------------------------
SEARCH_DESCRIPTION = """\
Search an index: text -> images (--text, or --queries FILE with one query per line, batched) or
image -> captions (--image_id). The top --shortlist items by shortlist vector are re-ranked by the
exact model (--shortlist 0: the whole gallery exactly):

  vsl search --index index/ --text "a man riding a horse" --k 10 --shortlist 100
  vsl search --index index/ --image_id 17 --json
"""


def add_search_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", required=True, default=argparse.SUPPRESS, help="index folder of vsl index (required)")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", help="a text query (text -> images) (default: none)")
    what.add_argument("--queries", metavar="FILE", help="a file of text queries, one per line (default: none)")
    what.add_argument("--image_id", type=int, help="a gallery image (image -> captions) (default: none)")
    parser.add_argument("--k", type=int, default=10, help="results per query")
    parser.add_argument("--shortlist", type=int, default=100,
                        help="candidates re-ranked by the exact model; 0 = exhaustive exact scoring")
    parser.add_argument("--json", action="store_true", help="one JSON object per query on standard output (default: off)")
    parser.add_argument("--checkpoint", default=None, help="the index's checkpoint (default: the path in its manifest)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")


def run_search(args: argparse.Namespace) -> int:
    from .index import Index

    queries = _read_queries(args.queries) if args.queries else None
    index = Index.load(args.index, device=args.device, checkpoint=args.checkpoint)
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
             f"  {'rank':>4}  {kind + ' id':>10}  {'score':>7}  {'shortlist':>9}  captions"]
    for hit in result.hits:
        text = " | ".join(hit.captions)
        lines.append(f"  {hit.rank:>4}  {hit.id:>10}  {hit.score:7.4f}  {hit.shortlist_score:9.4f}  {text}")
    return "\n".join(lines)
