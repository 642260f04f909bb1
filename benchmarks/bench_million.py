"""A large gallery on one machine: the shortlist tier and memory-mapped re-ranking at scale (issue 21, part 3).

    python benchmarks/bench_million.py --images 100000 --out /work/million-data/100k [--queries 200]
    python benchmarks/bench_million.py --tiny            # seconds; what tests/test_benchmarks.py runs

What it measures, per index type (``flat`` = the exact shortlist, the baseline of the same run;
``hnsw``; an IVF-PQ factory string with refinement), in both directions (text->image: caption
queries against the image vectors; image->text: image queries against the caption vectors):

* build time of the FAISS index (:func:`vsl.retrieval.faiss_index.make_faiss`, the code ``vsl index``
  runs) and its size on disk (the serialized index);
* query latency p50 / p99 at K = 100: shortlist search (:func:`faiss_index.search`, the defaults
  efSearch / nprobe of ``faiss_index.py``) plus the re-ranking of the 100 candidates against their
  embeddings **read from a memory-mapped float16 file** (regions of images, words of captions);
* shortlist recall@100 against flat (fraction of flat's top 100 found) and R@100 of the ground truth;
* resident memory of this process (VmRSS and its peak VmHWM from /proc/self/status; pages of the
  memory-mapped embeddings that re-ranking touched count in VmRSS).

The gallery is synthetic at the demo feature sizes (36 regions x 128 dims, shortlist vectors of 128
dims, one caption per image): clustered unit vectors, the caption of image i a noisy copy of it, all
written block by block to memory-mapped files under ``--out`` (bounded memory, resumable: a file
already complete is reused). The re-ranking score is a stand-in for the trained exact model's
(max over regions of the word-region cosine, mean over words): it has the exact model's memory
access pattern (36 x d float16 per candidate from the mmap), not its arithmetic cost.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
if importlib.util.find_spec("vsl") is None:      # running from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import markdown_table  # noqa: E402

REGIONS, EMBED, DIM, WORDS = 36, 128, 128, 12
BLOCK = 16384
K = 100


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _array(path: Path, shape, dtype, fill) -> np.ndarray:
    """A memory-mapped array written block by block by ``fill(lo, hi) -> block``; reused when complete."""
    done = path.with_suffix(".done")
    if path.is_file() and done.is_file():
        return np.load(path, mmap_mode="r")
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    for lo in range(0, shape[0], BLOCK):
        hi = min(lo + BLOCK, shape[0])
        arr[lo:hi] = fill(lo, hi)
    arr.flush()
    del arr
    done.write_text("ok\n")
    return np.load(path, mmap_mode="r")


def make_gallery(out: Path, n: int, seed: int = 0, topics: int = 2048) -> dict:
    """Synthetic shortlist vectors (n, DIM) float32 of images and captions, and the float16 region
    (n, REGIONS, EMBED) and word (n, WORDS, EMBED) embeddings, streamed to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    centers = _unit(np.random.default_rng(seed).standard_normal((topics, DIM)).astype(np.float32))

    def images(lo, hi):             # each block its own stream: the file does not depend on BLOCK order
        rng = np.random.default_rng([seed, 1, lo])
        t = rng.integers(0, topics, hi - lo)
        return _unit(centers[t] + 0.9 * rng.standard_normal((hi - lo, DIM)).astype(np.float32) / np.sqrt(DIM) * 4)

    t0 = time.perf_counter()
    img = _array(out / "image_global.npy", (n, DIM), np.float32, images)

    def captions(lo, hi):
        rng = np.random.default_rng([seed, 2, lo])
        noise = rng.standard_normal((hi - lo, DIM)).astype(np.float32) / np.sqrt(DIM)
        return _unit(img[lo:hi] + 0.8 * noise)

    cap = _array(out / "caption_global.npy", (n, DIM), np.float32, captions)

    def spread(vecs, rows, salt, lo):  # per-item embeddings around the global vector (EMBED == DIM here)
        rng = np.random.default_rng([seed, salt, lo])
        x = vecs[:, None, :] + rng.standard_normal((len(vecs), rows, EMBED)).astype(np.float32) / np.sqrt(EMBED)
        return _unit(x).astype(np.float16)

    regions = _array(out / "regions.npy", (n, REGIONS, EMBED), np.float16,
                     lambda lo, hi: spread(img[lo:hi], REGIONS, 3, lo))
    words = _array(out / "words.npy", (n, WORDS, EMBED), np.float16,
                   lambda lo, hi: spread(cap[lo:hi], WORDS, 4, lo))
    return {"image_global": img, "caption_global": cap, "regions": regions, "words": words,
            "seconds": time.perf_counter() - t0}


def rerank(query: np.ndarray, gallery: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Scores of ``ids`` (S,) for one query's embeddings ``(L, d)`` against ``gallery[ids]`` ``(S, R, d)``
    (memory-mapped float16): max over the gallery rows, mean over the query rows."""
    ids = ids[ids >= 0]
    order = np.argsort(ids)                                 # sorted reads from the mmap
    cand = np.asarray(gallery[ids[order]], dtype=np.float32)  # (S, R, d)
    sims = np.einsum("ld,srd->slr", query.astype(np.float32), cand)
    scores = np.empty(len(ids), np.float32)
    scores[order] = sims.max(axis=2).mean(axis=1)
    return ids[np.argsort(-scores)]


def measure(g: dict, index_type: str, queries: int, seed: int, work: Path, flat_top=None) -> dict:
    from vsl.retrieval.faiss_index import make_faiss, search, write_faiss

    rng = np.random.default_rng(seed + 7)
    n = len(g["image_global"])
    q = np.sort(rng.choice(n, size=min(queries, n), replace=False))
    row = {"index": index_type}
    tops = {}
    for direction, gallery_vecs, query_vecs, gallery_emb, query_emb in (
            ("t2i", g["image_global"], g["caption_global"], g["regions"], g["words"]),
            ("i2t", g["caption_global"], g["image_global"], g["words"], g["regions"])):
        t0 = time.perf_counter()
        index = make_faiss(gallery_vecs, index_type, seed=seed)
        row[f"{direction}_build_s"] = time.perf_counter() - t0
        path = work / f"{direction}-{index_type.replace(',', '_')}.faiss"
        write_faiss(path, index)
        row[f"{direction}_disk_mb"] = path.stat().st_size / 2**20
        qv = np.ascontiguousarray(query_vecs[q])
        search(index, qv[:5], K)                             # warm-up
        lat, top = [], np.empty((len(q), K), np.int64)
        for i in range(len(q)):
            t1 = time.perf_counter()
            _, ids = search(index, qv[i:i + 1], K)
            rerank(np.asarray(query_emb[q[i]]), gallery_emb, ids[0])
            lat.append(time.perf_counter() - t1)
            top[i] = ids[0]
        tops[direction] = top
        row[f"{direction}_p50_ms"] = 1e3 * float(np.median(lat))
        row[f"{direction}_p99_ms"] = 1e3 * float(np.percentile(lat, 99))
        row[f"{direction}_R@100"] = float(np.mean([qi in t for qi, t in zip(q, top)]))   # own item = ground truth
        if flat_top is not None:
            row[f"{direction}_recall_vs_flat"] = float(np.mean(
                [len(np.intersect1d(a, b[b >= 0])) / K for a, b in zip(flat_top[direction], top)]))
        del index
    row["rss_mb"], row["peak_rss_mb"] = _status_mb("VmRSS"), _status_mb("VmHWM")
    return row, tops


def run(args) -> list:
    import faiss

    faiss.omp_set_num_threads(args.threads)
    out = Path(args.out)
    g = make_gallery(out, args.images, args.seed)
    print(f"gallery of {args.images:,} images: {g['seconds']:.1f} s to write, "
          f"{sum((out / f).stat().st_size for f in ('image_global.npy', 'caption_global.npy', 'regions.npy', 'words.npy')) / 2**30:.2f} GiB",
          flush=True)
    rows = []
    flat, flat_top = measure(g, "flat", args.queries, args.seed, out)
    rows.append(flat)
    print(json.dumps(flat), flush=True)
    for index_type in args.index_types.split(";"):
        row, _ = measure(g, index_type, args.queries, args.seed, out, flat_top)
        rows.append(row)
        print(json.dumps(row), flush=True)
    for r in rows:
        r["t2i_speedup"] = flat["t2i_p50_ms"] / r["t2i_p50_ms"]
    cols = ["index", "t2i_build_s", "t2i_disk_mb", "t2i_p50_ms", "t2i_p99_ms", "t2i_speedup", "t2i_recall_vs_flat",
            "t2i_R@100", "i2t_build_s", "i2t_p50_ms", "i2t_p99_ms", "i2t_recall_vs_flat", "i2t_R@100", "rss_mb",
            "peak_rss_mb"]
    print(markdown_table(cols, [[r.get(c, "-") for c in cols] for r in rows]))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return rows


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--out", default=None, help="folder of the generated gallery (default: a temporary one)")
    parser.add_argument("--index_types", default="hnsw;IVF1024,PQ32x4fs,RFlat",
                        help="';'-separated index types after the flat baseline")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    parser.add_argument("--tiny", action="store_true", help="2,000 images, 20 queries, small IVF: seconds")
    args = parser.parse_args(argv)
    if args.tiny:
        args.images, args.queries, args.index_types = 2000, 20, "hnsw;IVF16,PQ32x4fs,RFlat"
    tmp = None
    if args.out is None:
        tmp = args.out = tempfile.mkdtemp(prefix="bench-million-")
    try:
        return run(args)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
