"""Benchmark: the split's semantic matrix at COCO-train scale, kept sparse.

Builds a 566,435-caption corpus (the shared COCO captions repeated with shuffled word order), then,
each in a fresh subprocess so that peak RSS (ru_maxrss) is its own:

* ``tfidf``: fit :class:`vsl.data.semantics.TfidfSemantics` on the whole corpus (target < 60 s and
  < 1.5 GB peak RSS) and time the B x B matrices of batches of 128.
* ``dense``: the published dense TF-IDF matrix on a subset of the corpus, against ``sparse`` on the
  same subset (the baseline; the dense matrix of the full corpus is reported, not built).
* ``cider``: fit :class:`vsl.data.semantics.CiderSemantics` on the 25,000 COCO 5K-test captions.

Usage: python benchmarks/bench_semantics.py [--captions 566435] [--subset 10000] [--batches 50]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
COCO_TRAIN_CAPTIONS = 566_435


def shared_data_dir() -> Path:
    return Path(os.environ.get("VSL_DATA_DIR", ROOT.parent / "shared" / "data"))


def source_captions() -> list:
    folder = shared_data_dir() / "coco_precomp"
    lines = []
    for name in ("testall_caps.txt", "dev_caps.txt"):
        if (folder / name).is_file():
            lines += (folder / name).read_text(encoding="utf-8").splitlines()
    if not lines:
        sys.exit(f"no shared COCO captions under {folder}; set VSL_DATA_DIR to the shared data folder")
    return lines


def write_corpus(path: Path, size: int, seed: int = 0, rare_words: int = 22_000, rare_rate: float = 0.1) -> None:
    """``size`` captions: the shared ones, then repeats of them with their words shuffled.

    In the repeats, ``rare_rate`` of the captions get one word replaced by one of ``rare_words`` made-up
    words, so that the vocabulary is about COCO train's 27k words (mostly rare ones and typos) rather
    than the 8k of the shared captions.
    """
    base = source_captions()
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    rare = ["".join(rng.choice(letters, size=rng.integers(5, 10))) for _ in range(rare_words)]
    out = list(base[:size])
    while len(out) < size:
        for caption in base[: size - len(out)]:
            words = [caption.split()[i] for i in rng.permutation(len(caption.split()))]
            if rng.random() < rare_rate:
                words[rng.integers(len(words))] = rare[rng.integers(rare_words)]
            out.append(" ".join(words))
    path.write_text("\n".join(out) + "\n", encoding="utf-8")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0     # Linux: KiB


def batch_ids(num_captions: int, batches: int, batch_size: int = 128) -> np.ndarray:
    rng = np.random.default_rng(1)
    return np.stack([rng.choice(num_captions, batch_size, replace=False) for _ in range(batches)])


def measure(mode: str, corpus: Path, subset: int, batches: int) -> dict:
    """Runs in the subprocess: one measurement, returned as a dict."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    from vsl.data import read_captions
    from vsl.data.semantics import (CiderSemantics, TfidfSemantics, caption_semantic_from_rows,
                               image_semantic_from_rows)

    captions = read_captions(corpus)
    if mode in ("dense", "sparse"):
        captions = captions[:subset]
    if mode == "cider":
        captions = source_captions()[:25000]
    result = {"captions": len(captions)}
    start = time.perf_counter()
    if mode == "dense":
        # The published computation: a dense float64 matrix of all captions, rows indexed per batch.
        matrix = TfidfVectorizer().fit_transform(captions).toarray()
        result["vocabulary"] = matrix.shape[1]
        result["matrix_mb"] = matrix.nbytes / 2 ** 20

        def image_semantic(ids):
            k = 5
            rows = matrix[(ids[:, None] // k * k + np.arange(k)).ravel()].reshape(len(ids), k, -1)
            return image_semantic_from_rows(rows), caption_semantic_from_rows(matrix[ids])
    else:
        semantics = (CiderSemantics(5) if mode == "cider" else TfidfSemantics(5)).fit(captions)
        if mode != "cider":
            result["vocabulary"] = semantics.tfidf.shape[1]
            result["nnz"] = int(semantics.tfidf.nnz)
            t = semantics.tfidf
            result["matrix_mb"] = (t.data.nbytes + t.indices.nbytes + t.indptr.nbytes) / 2 ** 20

        def image_semantic(ids):
            return semantics.image_semantic(ids, 5), semantics.caption_semantic(ids)
    result["fit_s"] = time.perf_counter() - start
    times = []
    for ids in batch_ids(len(captions), batches):
        start = time.perf_counter()
        image_semantic(ids)
        times.append(time.perf_counter() - start)
    result["batch_ms_median"] = 1000 * float(np.median(times))
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def run_subprocess(mode: str, corpus: Path, subset: int, batches: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--measure", mode, "--corpus", str(corpus),
                          "--subset", str(subset), "--batches", str(batches)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--captions", type=int, default=COCO_TRAIN_CAPTIONS)
    parser.add_argument("--subset", type=int, default=10000, help="captions for the dense-vs-sparse baseline")
    parser.add_argument("--batches", type=int, default=50, help="batches of 128 timed per measurement")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, Path(args.corpus), args.subset, args.batches)))
        return

    with tempfile.TemporaryDirectory(prefix="vsl-bench-semantics-") as tmp:
        corpus = Path(tmp) / "train_caps.txt"
        start = time.perf_counter()
        write_corpus(corpus, args.captions)
        print(f"corpus: {args.captions:,} captions ({corpus.stat().st_size / 1e6:.0f} MB) "
              f"written in {time.perf_counter() - start:.1f} s; each row below is a fresh process\n")
        rows = {mode: run_subprocess(mode, corpus, args.subset, args.batches)
                for mode in ("tfidf", "sparse", "dense", "cider")}

    full, sparse, dense, cider = rows["tfidf"], rows["sparse"], rows["dense"], rows["cider"]
    header = f"{'measure':<34}{'captions':>10}{'fit s':>9}{'batch ms':>10}{'peak RSS MiB':>14}"
    print(header + "\n" + "-" * len(header))
    for name, r in (("tfidf sparse (vsl), full corpus", full), ("tfidf sparse (vsl), subset", sparse),
                    ("tfidf dense (published), subset", dense), ("cider-D (vsl), COCO 5K test", cider)):
        print(f"{name:<34}{r['captions']:>10,}{r['fit_s']:>9.1f}{r['batch_ms_median']:>10.2f}{r['peak_rss_mb']:>14.0f}")
    dense_full_gb = full["captions"] * full["vocabulary"] * 8 / 1e9
    print(f"\nfull corpus: {full['vocabulary']:,} words, {full['nnz']:,} non-zeros, sparse matrix "
          f"{full['matrix_mb']:.0f} MiB vs dense float64 {dense_full_gb:.0f} GB (not built)")
    print(f"subset of {sparse['captions']:,}: dense / sparse matrix bytes x{dense['matrix_mb'] / sparse['matrix_mb']:.0f} "
          f"({dense['matrix_mb']:.0f} MiB vs {sparse['matrix_mb']:.1f} MiB), peak RSS x{dense['peak_rss_mb'] / sparse['peak_rss_mb']:.2f}, "
          f"batch time x{dense['batch_ms_median'] / sparse['batch_ms_median']:.1f} (medians over {args.batches} batches of 128)")
    ok_time, ok_rss = full["fit_s"] < 60, full["peak_rss_mb"] * 2 ** 20 < 1.5e9
    print(f"targets (full corpus): fit < 60 s: {'PASS' if ok_time else 'FAIL'} ({full['fit_s']:.1f} s); "
          f"peak RSS < 1.5 GB: {'PASS' if ok_rss else 'FAIL'} ({full['peak_rss_mb']:.0f} MiB = {full['peak_rss_mb'] * 2 ** 20 / 1e9:.2f} GB)")
    if not (ok_time and ok_rss):
        sys.exit(1)


if __name__ == "__main__":
    main()
