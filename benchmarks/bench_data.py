"""Benchmark: COCO-train-sized training batches from memory-mapped features, peak RSS.

Builds a COCO-train-shaped split in a temporary folder: ``train_ims.npy`` of 113,287 x 36 x 2048
float32 (33 GB, made sparsely with ``np.lib.format.open_memmap``, so it takes no disk) and 566,435
captions (the shared COCO captions repeated with shuffled word order). Then, each in a fresh process
so that ``ru_maxrss`` is its own, iterates shuffled training batches of 128 through
:func:`vsl.data.make_loader`:

* ``vsl``: 200 batches in process (target: peak RSS < 2 GB);
* ``vsl + tfidf``: the same with the VSL image semantic matrices (TF-IDF fitted on all 566k captions);
* ``vsl, 2 workers``: the same in two worker processes (peak of the main process and of a worker);
* baseline ``memmap slicing``: the same loader, but each image copied out of the memory map
  (``np.array(images[i])``); pages read through a mapping stay resident in the process.
  The published loader, ``np.load`` of the whole array, would need the full 33 GB (not run).

Then, in this process, tokenizes the 566,435 captions with :func:`vsl.data.tokenize` (NLTK's Punkt with
the English model, then the Treebank rules: ``nltk.word_tokenize``) against the baseline, the
regular-expression imitation of Punkt that vsl used before issue 12 (target: at most 2x its time).
The two alternate over chunks of the corpus, so that both see the same machine load.

Usage: python benchmarks/bench_data.py [--batches 200] [--baseline-batches 50] [--workdir DIR]
                                       [--tokenize-only] [--tokenize-chunks 20]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_semantics import write_corpus  # noqa: E402  (same caption corpus as the semantics benchmark)

COCO_TRAIN_IMAGES = 113_287
DATA_NAME = "coco_precomp"


def shared_vocab_file() -> Path:
    return Path(os.environ.get("VSL_DATA_DIR", ROOT.parent / "shared" / "data")) / "vocab" / f"{DATA_NAME}_vocab.json"


def make_split(root: Path, images: int, regions: int, dim: int) -> None:
    folder = root / DATA_NAME
    folder.mkdir(parents=True, exist_ok=True)
    features = np.lib.format.open_memmap(folder / "train_ims.npy", mode="w+", dtype=np.float32,
                                         shape=(images, regions, dim))
    features[0] = 1.0                   # a few real pages; the rest of the file is a hole
    features.flush()
    del features
    write_corpus(folder / "train_caps.txt", 5 * images)


def peak_rss_mb(who=resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024.0            # Linux: KiB


def measure(mode: str, root: Path, batches: int, batch_size: int, seed: int) -> dict:
    """Runs in the subprocess: one measurement, returned as a dict."""
    from vsl.data import PrecompDataset, make_loader
    from vsl.data.semantics import build_semantics
    from vsl.data.vocab import Vocabulary

    class MemmapSlicing(PrecompDataset):
        def read_image(self, image_id):
            return np.array(self.images[image_id])

    vocab_path = shared_vocab_file()
    start = time.perf_counter()
    dataset_class = MemmapSlicing if mode == "memmap" else PrecompDataset
    vocab = Vocabulary.from_json(vocab_path) if vocab_path.is_file() else None
    dataset = dataset_class(root, DATA_NAME, "train", vocab or Vocabulary())
    if vocab is None:
        dataset.vocab = Vocabulary.build(dataset.captions[:50000])
    semantics = build_semantics("tfidf", dataset.captions, dataset.captions_per_image) if mode == "tfidf" else None
    setup_s = time.perf_counter() - start
    loader = make_loader(dataset, batch_size, shuffle=True, seed=seed, epoch=0, semantics=semantics,
                         workers=2 if mode == "workers" else 0)
    rss_before = peak_rss_mb()
    start, seen, checksum = time.perf_counter(), 0, 0.0
    for i, batch in enumerate(loader):
        if i == batches:
            break
        seen += 1
        checksum += float(batch.images[:, 0, 0].sum()) + float(batch.lengths.sum())
        assert batch.images.shape == (batch_size, dataset.num_regions, dataset.img_dim)
        assert semantics is None or batch.image_semantic.shape == (batch_size, batch_size)
    seconds = time.perf_counter() - start
    del loader                              # joins the workers, so that RUSAGE_CHILDREN has them
    return {"batches": seen, "setup_s": setup_s, "seconds": seconds, "rss_before_mb": rss_before,
            "peak_rss_mb": peak_rss_mb(), "worker_peak_rss_mb": peak_rss_mb(resource.RUSAGE_CHILDREN),
            "checksum": checksum}


# The tokenizer of vsl before issue 12 (src/vsl/vocab.py at commit 992295d): Punkt imitated by a break after
# ./!/? + whitespace unless the word before is one of 13 abbreviations. Kept only as the timing baseline.
_OLD_BREAK = re.compile(r"(?<=[.!?])\s+")
_OLD_ABBREVIATIONS = frozenset({"mr.", "mrs.", "ms.", "dr.", "st.", "jr.", "sr.", "vs.", "mt.",
                                "e.g.", "i.e.", "u.s.", "etc."})
_OLD_TREEBANK = None


def regex_imitation_tokenize(text: str) -> list:
    from nltk.tokenize import NLTKWordTokenizer

    global _OLD_TREEBANK
    _OLD_TREEBANK = _OLD_TREEBANK or NLTKWordTokenizer()
    parts = _OLD_BREAK.split(text.lower())
    sentences = parts[:1]
    for part in parts[1:]:
        last_word = sentences[-1].rsplit(None, 1)[-1] if sentences[-1].strip() else ""
        if last_word in _OLD_ABBREVIATIONS:
            sentences[-1] = f"{sentences[-1]} {part}"
        else:
            sentences.append(part)
    return [token for sentence in sentences for token in _OLD_TREEBANK.tokenize(sentence)]


def measure_tokenize(captions: list, chunks: int) -> dict:
    """Seconds to tokenize ``captions`` with vsl's tokenizer and with the baseline, chunk by chunk."""
    from vsl.data.vocab import sentence_tokenizer, tokenize

    start = time.perf_counter()
    sentence_tokenizer()                            # the English Punkt model, built once per process
    model_s = time.perf_counter() - start
    bounds = np.linspace(0, len(captions), chunks + 1).astype(int)
    seconds = {"vsl": 0.0, "baseline": 0.0}
    ratios, differ = [], 0
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        part, chunk_s, tokens = captions[a:b], {}, {}
        # alternate which goes first, so that neither always runs on a warmer cache
        for name in (("baseline", "vsl") if i % 2 == 0 else ("vsl", "baseline")):
            fn = tokenize if name == "vsl" else regex_imitation_tokenize
            start = time.perf_counter()
            tokens[name] = [fn(c) for c in part]
            chunk_s[name] = time.perf_counter() - start
            seconds[name] += chunk_s[name]
        ratios.append(chunk_s["vsl"] / chunk_s["baseline"])
        differ += sum(x != y for x, y in zip(tokens["vsl"], tokens["baseline"]))
    punkt_decides = sum(re.search(r"[.?!]", c.lower().rstrip()[:-1]) is not None for c in captions)
    return {"captions": len(captions), "model_s": model_s, "vsl_s": seconds["vsl"],
            "baseline_s": seconds["baseline"], "median_chunk_ratio": float(np.median(ratios)),
            "differ": differ, "punkt_decides": punkt_decides}


def print_tokenize(r: dict) -> bool:
    ratio = r["vsl_s"] / r["baseline_s"]
    header = f"{'tokenizer':<44}{'captions':>10}{'seconds':>9}{'captions/s':>12}{'us/caption':>12}"
    print(header + "\n" + "-" * len(header))
    for name, key in (("vsl.data.tokenize (NLTK Punkt + Treebank)", "vsl_s"),
                      ("baseline: regex imitation (before issue 12)", "baseline_s")):
        print(f"{name:<44}{r['captions']:>10,}{r[key]:>9.1f}{r['captions'] / r[key]:>12,.0f}"
              f"{1e6 * r[key] / r['captions']:>12.1f}")
    print(f"\nEnglish Punkt model built in {1e3 * r['model_s']:.0f} ms; Punkt consulted for "
          f"{r['punkt_decides']:,} captions (a ./?/! before the last character), the rest take the fast path; "
          f"{r['differ']:,} captions tokenized differently by the baseline")
    ok = ratio <= 2.0
    print(f"target: vsl / baseline time <= 2: {'PASS' if ok else 'FAIL'} (x{ratio:.2f} in total, "
          f"median over chunks x{r['median_chunk_ratio']:.2f})")
    return ok


def run_subprocess(mode: str, root: Path, batches: int, batch_size: int, seed: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--measure", mode, "--root", str(root),
                          "--batches", str(batches), "--batch-size", str(batch_size), "--seed", str(seed)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=COCO_TRAIN_IMAGES)
    parser.add_argument("--regions", type=int, default=36)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--baseline-batches", type=int, default=50,
                        help="batches for the memmap-slicing baseline (its RSS grows ~37 MB a batch)")
    parser.add_argument("--workdir", help="folder for the generated split (default: a temporary folder)")
    parser.add_argument("--tokenize-only", action="store_true", help="only the tokenization timing")
    parser.add_argument("--tokenize-chunks", type=int, default=20,
                        help="chunks over which vsl and the baseline tokenizer alternate")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, Path(args.root), args.batches, args.batch_size, args.seed)))
        return

    root = Path(tempfile.mkdtemp(prefix="vsl-bench-data-", dir=args.workdir))
    try:
        start = time.perf_counter()
        make_split(root, args.images, args.regions, args.dim)
        ims = root / DATA_NAME / "train_ims.npy"
        print(f"split: {ims} {args.images:,} x {args.regions} x {args.dim} float32 "
              f"({ims.stat().st_size / 1e9:.1f} GB apparent, {ims.stat().st_blocks * 512 / 1e6:.1f} MB on disk), "
              f"{5 * args.images:,} captions; made in {time.perf_counter() - start:.1f} s\n")
        from vsl.data import read_captions

        captions = read_captions(root / DATA_NAME / "train_caps.txt")
        if args.tokenize_only:
            sys.exit(0 if print_tokenize(measure_tokenize(captions, args.tokenize_chunks)) else 1)
        print("each row is a fresh process iterating shuffled batches of "
              f"{args.batch_size} through vsl.data.make_loader\n")
        runs = [("vsl (pread per image)", "vsl", args.batches),
                ("vsl + tfidf semantics", "tfidf", args.batches),
                ("vsl, 2 workers", "workers", args.batches),
                ("baseline: memmap slicing", "memmap", args.baseline_batches)]
        # A different shuffling seed per row, so that no row reads pages that an earlier row left cached.
        rows = [(name, run_subprocess(mode, root, n, args.batch_size, seed))
                for seed, (name, mode, n) in enumerate(runs)]
        tokenized = measure_tokenize(captions, args.tokenize_chunks)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    header = (f"{'loader':<27}{'batches':>8}{'setup s':>9}{'batches/s':>11}{'RSS before MiB':>16}"
              f"{'peak RSS MiB':>14}{'worker peak MiB':>18}{'MiB/batch':>11}")
    print(header + "\n" + "-" * len(header))
    for name, r in rows:
        growth = (r["peak_rss_mb"] - r["rss_before_mb"]) / max(1, r["batches"])
        worker = f"{r['worker_peak_rss_mb']:.0f}" if r["worker_peak_rss_mb"] > 0 else "-"
        print(f"{name:<27}{r['batches']:>8}{r['setup_s']:>9.1f}{r['batches'] / r['seconds']:>11.1f}"
              f"{r['rss_before_mb']:>16.0f}{r['peak_rss_mb']:>14.0f}{worker:>18}{growth:>11.2f}")
    whole = args.images * args.regions * args.dim * 4 / 1e9
    print(f"\npublished loader (np.load of the whole array): {whole:.1f} GB resident (not run)")
    ours, baseline = rows[0][1], rows[3][1]
    growth_ours = (ours["peak_rss_mb"] - ours["rss_before_mb"]) / ours["batches"]
    growth_base = (baseline["peak_rss_mb"] - baseline["rss_before_mb"]) / baseline["batches"]
    print(f"RSS growth per batch, baseline / vsl: x{growth_base / max(growth_ours, 0.01):.0f} "
          f"({growth_base:.1f} vs {growth_ours:.2f} MiB); baseline extrapolated to {args.batches} batches: "
          f"{baseline['rss_before_mb'] + growth_base * args.batches:.0f} MiB")
    worst = max(max(r["peak_rss_mb"], r["worker_peak_rss_mb"]) for _, r in rows[:3])
    ok = worst * 2 ** 20 < 2e9
    print(f"target: peak RSS < 2 GB over {args.batches} batches: {'PASS' if ok else 'FAIL'} "
          f"(worst vsl row {worst:.0f} MiB = {worst * 2 ** 20 / 1e9:.2f} GB)\n")
    ok = print_tokenize(tokenized) and ok
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
