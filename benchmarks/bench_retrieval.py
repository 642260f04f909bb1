"""Two-stage retrieval against exhaustive scoring, same model, same run (issue 13).

    # 1. a split: exhaustive `vsl eval` end to end vs `vsl eval --shortlist K` for each K
    python benchmarks/bench_retrieval.py eval --checkpoint CK --data_path DATA --vocab_path VOCAB \
        [--ks 10,50,100,200] [--exhaustive run|estimate] [--plot docs/retrieval_recall_vs_k.png] [--json OUT]
    # 1b. the same accuracy comparison on random queries (splits too large to score exhaustively here)
    python benchmarks/bench_retrieval.py sampled --checkpoint CK --data_path DATA --vocab_path VOCAB [--ks 100,200]
    # 2. shortlist recall at K = 10/50/100/200 of several checkpoints (fit-shortlist vs joint training)
    python benchmarks/bench_retrieval.py recall --checkpoint CK1 --checkpoint CK2 --data_path DATA --vocab_path VOCAB
    # 3. text-query latency and memory against a large pure image gallery
    python benchmarks/bench_retrieval.py latency --checkpoint CK --features FEATURES --index_dir DIR \
        --queries_file CAPTIONS.txt [--queries 30] [--k 10] [--shortlist 100]
    # 4. per-pair cost of the re-ranking scorer (score_pairs) against the all-pairs scorer, synthetic
    python benchmarks/bench_retrieval.py pairs [--images 1000 --captions 5000 --k 100 --forward_images 100]
    # 5. cost of a fit-shortlist step per head width at the published embedding size, synthetic
    python benchmarks/bench_retrieval.py fit-cost [--embed_size 1024 --hidden 0,512 --captions 566435]

``eval`` times whole calls (checkpoint loading, tokenization, encoding, scoring, metrics):
:func:`vsl.evaluation.evaluate` (exhaustive) and :func:`vsl.retrieval.evaluate_shortlist` for each
K; K = 100 is timed a second time after the exhaustive run and the median is used. With
``--exhaustive estimate`` the exhaustive time is measured encoding plus the per-pair cost of
exhaustive scoring measured on a slice of the images (for splits too large to score on a shared CPU),
and its metrics are not available. The table gives both directions' R@1/5/10, the largest change
against exhaustive, the shortlist recall at K, the pairs scored and the speed-up.

``latency`` builds (once) a flat index of the gallery, then in a fresh process loads it, runs a
few warm-up queries and times ``--queries`` single text queries (median, p90), reporting the
process's resident memory (VmRSS after the queries and its peak VmHWM); one exhaustive query
(``shortlist=0``) in the same process is the baseline.

Use one torch thread (``--threads 1``, the default) on a shared 2-core machine: two threads slow
down many-fold when another job holds a core.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
if importlib.util.find_spec("vsl") is None:      # running from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import markdown_table  # noqa: E402

DIRS = ("i2t", "t2i")
RS = ("r1", "r5", "r10")


# --------------------------------------------------------------------------------------------
# eval
# --------------------------------------------------------------------------------------------
def exhaustive_estimate(args) -> dict:
    """Encoding time plus the per-pair cost of exhaustive scoring measured on ``--estimate_images`` images."""
    from vsl.data import PrecompDataset
    from vsl.evaluation import encode_split, load_for_eval, score

    t0 = time.perf_counter()
    loaded = load_for_eval(args.checkpoint, torch.device("cpu"), args.vocab_path)
    ds = PrecompDataset(args.data_path, loaded.config.data_name, args.split, loaded.vocab)
    emb = encode_split(loaded.model, ds.images[:ds.num_images], [loaded.vocab.encode(c) for c in ds.captions],
                       progress=False)
    encode = time.perf_counter() - t0
    s = args.estimate_images
    t1 = time.perf_counter()
    score(loaded.model, emb.subset(slice(0, s), slice(0, len(ds.captions))))
    per_pair = (time.perf_counter() - t1) / (s * len(ds.captions))
    pairs = ds.num_images * len(ds.captions)
    return {"seconds": encode + per_pair * pairs, "pairs_scored": pairs, "estimated": True,
            "per_pair_us": 1e6 * per_pair, "encode_seconds": encode}


def run_eval(args) -> None:
    from vsl.evaluation import evaluate
    from vsl.retrieval import evaluate_shortlist

    common = dict(vocab_path=args.vocab_path, device="cpu", progress=False)
    ks = [int(k) for k in args.ks.split(",")]
    two_stage, times = {}, {}
    for k in ks:
        t0 = time.perf_counter()
        two_stage[k] = evaluate_shortlist([args.checkpoint], args.data_path, args.split, shortlist=k, **common)
        times[k] = [time.perf_counter() - t0]
        print(f"shortlist K={k}: {times[k][0]:.1f} s, rsum {two_stage[k]['rsum']:.2f}", flush=True)
    if args.exhaustive == "run":
        t0 = time.perf_counter()
        exhaustive = evaluate([args.checkpoint], args.data_path, args.split, "full", **common)
        exhaustive["seconds"] = time.perf_counter() - t0
        exhaustive["pairs_scored"] = exhaustive["images"] * exhaustive["captions"]
    else:
        exhaustive = exhaustive_estimate(args)
    print(f"exhaustive: {exhaustive['seconds']:.1f} s{' (estimated)' if exhaustive.get('estimated') else ''}",
          flush=True)
    if not args.no_repeat:
        again = 100 if 100 in ks else ks[-1]
        t0 = time.perf_counter()
        evaluate_shortlist([args.checkpoint], args.data_path, args.split, shortlist=again, **common)
        times[again].append(time.perf_counter() - t0)

    header = ["method", "i2t R@1", "R@5", "R@10", "t2i R@1", "R@5", "R@10", "max abs dR@1", "max abs dR@5,10",
              "shortlist recall i2t/t2i", "pairs scored", "seconds", "speed-up"]
    rows = []
    has_metrics = "i2t" in exhaustive
    if has_metrics:
        rows.append(["exhaustive", *[exhaustive[d][r] for d in DIRS for r in RS], "-", "-", "-",
                     f"{exhaustive['pairs_scored']:,}", exhaustive["seconds"], 1.0])
    else:
        rows.append(["exhaustive (estimated)", *["-"] * 9, f"{exhaustive['pairs_scored']:,}",
                     exhaustive["seconds"], 1.0])
    for k in ks:
        r, sl = two_stage[k], two_stage[k]["shortlist"]
        seconds = statistics.median(times[k])
        d1 = max(abs(r[d]["r1"] - exhaustive[d]["r1"]) for d in DIRS) if has_metrics else "-"
        d510 = max(abs(r[d][x] - exhaustive[d][x]) for d in DIRS for x in ("r5", "r10")) if has_metrics else "-"
        rows.append([f"shortlist K={k}", *[r[d][x] for d in DIRS for x in RS], d1, d510,
                     f"{sl['recall_i2t']:.1f} / {sl['recall_t2i']:.1f}", f"{sl['pairs_scored']:,}", seconds,
                     exhaustive["seconds"] / seconds])
    n, m = two_stage[ks[0]]["images"], two_stage[ks[0]]["captions"]
    print(f"\n{n:,} images x {m:,} captions, {args.checkpoint}, torch threads {torch.get_num_threads()}:\n")
    print(markdown_table(header, rows))
    out = {"images": n, "captions": m, "exhaustive": exhaustive, "two_stage": {str(k): two_stage[k] for k in ks},
           "seconds": {str(k): times[k] for k in ks}}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))
    if args.plot:
        plot(out, ks, args.plot)


def plot(out: dict, ks, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.0, 3.2), dpi=100)
    for d, color, label in (("i2t", "tab:blue", "image->text"), ("t2i", "tab:orange", "text->image")):
        ax.plot(ks, [out["two_stage"][str(k)][d]["r1"] for k in ks], "o-", color=color, label=f"{label}, shortlist K")
        if "i2t" in out["exhaustive"]:
            ax.axhline(out["exhaustive"][d]["r1"], color=color, ls="--", lw=1, label=f"{label}, exhaustive")
    ax.set_xscale("log")
    ax.set_xticks(ks)
    ax.set_xticklabels([str(k) for k in ks])
    ax.set_xlabel("shortlist size K (log scale)")
    ax.set_ylabel("R@1 (%)")
    ax.set_title(f"two-stage R@1, demo model, {out['images']:,} x {out['captions']:,}", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    print(f"wrote {path}")


# --------------------------------------------------------------------------------------------
# sampled: accuracy on a random sample of queries when the exhaustive run is too slow
# --------------------------------------------------------------------------------------------
def run_sampled(args) -> None:
    """Exhaustive and two-stage R@1/5/10 on the same random queries, from one exhaustive row per query.

    For each sampled query all of its gallery pairs are scored exactly (``--sample_images`` image
    rows, ``--sample_captions`` caption columns); its two-stage ranking uses the same exact scores
    for its top K by shortlist cosine and the cosine below them, which is what ``evaluate_shortlist``
    computes (its exact scores equal these to float rounding).
    """
    from vsl.data import PrecompDataset
    from vsl.evaluation import encode_split, load_for_eval

    loaded = load_for_eval(args.checkpoint, torch.device("cpu"), args.vocab_path)
    ds = PrecompDataset(args.data_path, loaded.config.data_name, args.split, loaded.vocab)
    cpi, n, m = ds.captions_per_image, ds.num_images, len(ds.captions)
    emb = encode_split(loaded.model, ds.images[:n], [loaded.vocab.encode(c) for c in ds.captions], progress=False)
    model = loaded.model
    rng = np.random.default_rng(0)
    images = np.sort(rng.choice(n, args.sample_images, replace=False))
    captions = np.sort(rng.choice(m, args.sample_captions, replace=False))
    with torch.inference_mode():
        iv = model.shortlist.images(emb.images)
        cv = model.shortlist.captions(emb.captions, emb.lengths)
        t0 = time.perf_counter()
        rows = model.similarity(emb.images[images], emb.captions, emb.lengths)            # (a, m)
        cols = model.similarity(emb.images, emb.captions[captions], emb.lengths[captions])  # (n, b)
        seconds = time.perf_counter() - t0
        cos_rows, cos_cols = iv[images] @ cv.t(), iv @ cv[captions].t()

    def ranks_i2t(sims):             # best rank of an own caption, per sampled image
        order = torch.argsort(sims, dim=1, descending=True)
        own = (order // cpi) == torch.from_numpy(images).unsqueeze(1)
        return own.float().argmax(dim=1)

    def ranks_t2i(sims):             # rank of the own image, per sampled caption (sims: (n, b))
        order = torch.argsort(sims.t(), dim=1, descending=True)
        return (order == torch.from_numpy(captions // cpi).unsqueeze(1)).float().argmax(dim=1)

    def two_stage(exact, cos, dim, k):
        top = torch.topk(cos, k, dim=dim).indices
        out = cos - 3.0
        return out.scatter_(dim, top, exact.gather(dim, top) + 3.0)

    rows_out = []
    ks = [int(x) for x in args.ks.split(",")]
    for name, ranks, exact, cos, dim in (("i2t", ranks_i2t, rows, cos_rows, 1), ("t2i", ranks_t2i, cols, cos_cols, 0)):
        results = [("exhaustive", ranks(exact))]
        results += [(f"shortlist K={k}", ranks(two_stage(exact, cos, dim, k))) for k in ks]
        for label, r in results:
            rows_out.append([name, label, len(r), *[100.0 * float((r < x).float().mean()) for x in (1, 5, 10)]])
    print(f"\n{n:,} images x {m:,} captions; {args.sample_images} image queries x {m:,} captions and "
          f"{args.sample_captions} caption queries x {n:,} images scored exactly in {seconds:.0f} s:\n")
    print(markdown_table(["direction", "method", "queries", "R@1", "R@5", "R@10"], rows_out))


# --------------------------------------------------------------------------------------------
# pairs: per-pair cost of exact re-ranking against exhaustive scoring
# --------------------------------------------------------------------------------------------
def run_pairs(args) -> None:
    """Microseconds per pair of ``score_pairs`` on the union of K-shortlists (synthetic embeddings,
    COCO-like lengths, a shortlist correlated with the ground truth) and of ``forward`` (all pairs of
    ``--forward_images`` images x all captions), medians of ``--repeats``, and their largest difference."""
    from common import coco_like_lengths
    from vsl.config import Config
    from vsl.models import build_model
    from vsl.rerank import shortlist_pairs

    torch.manual_seed(0)
    n, m, d, s = args.images, args.captions, args.embed_size, args.sim_dim
    lengths = coco_like_lengths(m, seed=1)
    img = torch.nn.functional.normalize(torch.randn(n, 36, d), dim=-1)
    cap = torch.nn.functional.normalize(torch.randn(m, int(lengths.max()), d), dim=-1)
    cap = cap * (torch.arange(cap.size(1)) < lengths[:, None]).unsqueeze(-1)
    iv = torch.nn.functional.normalize(torch.randn(n, 16), dim=-1)   # caption j describes image j * n // m
    cv = torch.nn.functional.normalize(iv[torch.arange(m) * n // m] + 0.8 * torch.randn(m, 16), dim=-1)
    _, _, _, pi, pc = shortlist_pairs(iv, cv, args.k)
    f = args.forward_images
    rows = []
    for module in ("SGR", "SAF"):
        sim = build_model(Config(module_name=module, img_dim=16, word_dim=8, embed_size=d, sim_dim=s,
                                 vocab_size=30)).sim_enc.eval()
        t_pairs, t_all = [], []
        with torch.inference_mode():
            for _ in range(args.repeats):            # interleaved, so that load changes hit both alike
                t0 = time.perf_counter()
                exact = sim.score_pairs(img, cap, lengths, pi, pc)
                t_pairs.append((time.perf_counter() - t0) / pi.numel())
                t0 = time.perf_counter()
                full = sim(img[:f], cap, lengths)
                t_all.append((time.perf_counter() - t0) / full.numel())
        sel = pi < f
        diff = float((exact[sel] - full[pi[sel], pc[sel]]).abs().max())
        us_pairs, us_all = 1e6 * statistics.median(t_pairs), 1e6 * statistics.median(t_all)
        rows.append([module, us_pairs, us_all, us_pairs / us_all, f"{diff:.1e}"])
    print(f"\n{pi.numel():,} shortlisted pairs (K={args.k}, {n:,} images x {m:,} captions), all pairs of {f} images; "
          f"embed {d}, sim {s}, torch threads {torch.get_num_threads()}, medians of {args.repeats}:\n")
    print(markdown_table(["model", "score_pairs us/pair", "all-pairs us/pair", "ratio", "max |diff|"], rows))


# --------------------------------------------------------------------------------------------
# recall
# --------------------------------------------------------------------------------------------
def run_recall(args) -> None:
    from vsl.data import PrecompDataset
    from vsl.evaluation import encode_split, load_for_eval
    from vsl.retrieval import shortlist_recall

    rows = []
    for ck in args.checkpoint:
        loaded = load_for_eval(ck, torch.device("cpu"), args.vocab_path)
        ds = PrecompDataset(args.data_path, loaded.config.data_name, args.split, loaded.vocab)
        emb = encode_split(loaded.model, ds.images[:ds.num_images], [loaded.vocab.encode(c) for c in ds.captions],
                           progress=False)
        with torch.inference_mode():
            head = loaded.model.shortlist
            rec = shortlist_recall(head.images(emb.images), head.captions(emb.captions, emb.lengths),
                                   ds.captions_per_image)
        rows.append([ck, *[f"{rec['i2t'][k]:.1f} / {rec['t2i'][k]:.1f}" for k in rec["i2t"]]])
    print(markdown_table(["checkpoint", "K=10 i2t / t2i", "K=50", "K=100", "K=200"], rows))


# --------------------------------------------------------------------------------------------
# fit cost: one training step of the shortlist head at a given embedding size
# --------------------------------------------------------------------------------------------
def run_fit_cost(args) -> None:
    """Seconds per `vsl fit-shortlist` step (forward, backward, Adam) of each head width on synthetic
    frozen embeddings, the first width the baseline, and the fit time this gives for ``--captions``
    captions x ``--epochs`` epochs. Width 0 (the linear head) reads the pooled means, as the fit does."""
    from vsl.models.shortlist import ShortlistHead, shortlist_loss

    d, b, r, words = args.embed_size, args.batch_size, args.regions, args.words
    gen = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(b, r, d, generator=gen), dim=-1)
    caps = torch.nn.functional.normalize(torch.randn(b, words, d, generator=gen), dim=-1)
    lengths, ids = torch.full((b,), words), torch.arange(b)
    rows = []
    widths = [int(h) for h in args.hidden.split(",")]
    times = {}
    for hidden in widths:
        head = ShortlistHead(d, 256, hidden)
        opt = torch.optim.Adam(head.parameters(), lr=1e-3)
        img_in, cap_in, cap_len = ((images, caps, lengths) if hidden else
                                   (images.mean(1, keepdim=True), caps.mean(1, keepdim=True), torch.ones(b)))
        samples = []
        for step in range(args.repeats + 2):
            t0 = time.perf_counter()
            loss = shortlist_loss(head.images(img_in), head.captions(cap_in, cap_len), ids)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step >= 2:                                    # two warm-up steps
                samples.append(time.perf_counter() - t0)
        times[hidden] = statistics.median(samples)
    steps = -(-args.captions // b) * args.epochs
    base = times[widths[0]]
    for hidden in widths:
        rows.append([hidden or "0 (linear)", 1000 * times[hidden], times[hidden] / base, steps * times[hidden] / 60])
    print(f"\nembed {d}, batch {b} captions, {r} regions, {words} words, torch threads {torch.get_num_threads()}, "
          f"median of {args.repeats} steps; fit = {args.captions:,} captions x {args.epochs} epochs = {steps:,} steps:\n")
    print(markdown_table(["hidden units", "ms / step", f"x hidden {widths[0]}", "fit minutes"], rows))


# --------------------------------------------------------------------------------------------
# latency
# --------------------------------------------------------------------------------------------
def run_latency(args) -> None:
    from vsl.retrieval import build_index

    index_dir = Path(args.index_dir)
    t0 = time.perf_counter()
    build_index(args.checkpoint, features=args.features, out=index_dir, vocab_path=args.vocab_path, device="cpu",
                progress=not args.quiet, index_type=args.index_type)
    print(f"index ready in {time.perf_counter() - t0:.1f} s (0 if it was already built)", flush=True)
    cmd = [sys.executable, __file__, "latency-worker", "--index_dir", str(index_dir), "--queries_file",
           args.queries_file, "--queries", str(args.queries), "--k", str(args.k), "--shortlist", str(args.shortlist),
           "--threads", str(args.threads)]
    result = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    rows = [[f"shortlist {args.shortlist}", result["num_images"], args.queries, 1000 * result["median_s"],
             1000 * result["p90_s"], result["rss_mb"], result["hwm_mb"]],
            ["exhaustive (shortlist 0)", result["num_images"], 1, 1000 * result["exhaustive_s"], "-", "-", "-"]]
    print(markdown_table(["search", "gallery images", "queries", "median ms", "p90 ms", "VmRSS MB", "VmHWM MB"], rows))
    print(f"index on disk: {result['index_bytes'] / 2**20:,.0f} MiB ({result['bytes_per_image']:,.0f} bytes per image)")


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_latency_worker(args) -> None:
    from vsl.retrieval import Index

    rng = np.random.default_rng(0)
    lines = [x for x in Path(args.queries_file).read_text().splitlines() if x.strip()]
    queries = [lines[i] for i in rng.choice(len(lines), args.queries + 3, replace=False)]
    index = Index.load(args.index_dir)
    for q in queries[:3]:                                         # warm-up (first calls allocate)
        index.search_text([q], k=args.k, shortlist=args.shortlist)
    times = []
    for q in queries[3:]:
        t0 = time.perf_counter()
        index.search_text([q], k=args.k, shortlist=args.shortlist)
        times.append(time.perf_counter() - t0)
    rss, hwm = _status_mb("VmRSS"), _status_mb("VmHWM")
    t0 = time.perf_counter()
    index.search_text([queries[0]], k=args.k, shortlist=0)
    exhaustive = time.perf_counter() - t0
    files = index.manifest["files"]
    print(json.dumps({"num_images": index.num_images, "median_s": statistics.median(times),
                      "p90_s": float(np.percentile(times, 90)), "rss_mb": rss, "hwm_mb": hwm,
                      "exhaustive_s": exhaustive, "index_bytes": sum(files.values()),
                      "bytes_per_image": index.manifest["bytes_per_image"]}))


def split_arguments(parser: argparse.ArgumentParser, several: bool = False) -> None:
    """The checkpoint(s) and the split that the eval, sampled and recall benchmarks read."""
    parser.add_argument("--checkpoint", required=True, **({"action": "append"} if several else {}))
    parser.add_argument("--data_path", required=True)
    parser.add_argument("--vocab_path", required=True)
    parser.add_argument("--split", default="test")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("eval")
    split_arguments(p)
    p.add_argument("--ks", default="10,50,100,200")
    p.add_argument("--exhaustive", choices=("run", "estimate"), default="run")
    p.add_argument("--estimate_images", type=int, default=256)
    p.add_argument("--no_repeat", action="store_true", help="time K = 100 once only (large splits)")
    p.add_argument("--plot", default=None)
    p.add_argument("--json", default=None)
    p = sub.add_parser("sampled")
    split_arguments(p)
    p.add_argument("--ks", default="100")
    p.add_argument("--sample_images", type=int, default=100)
    p.add_argument("--sample_captions", type=int, default=500)
    p = sub.add_parser("pairs")
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--captions", type=int, default=5000)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--forward_images", type=int, default=100)
    p.add_argument("--embed_size", type=int, default=64)
    p.add_argument("--sim_dim", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p = sub.add_parser("fit-cost", help=run_fit_cost.__doc__.split("\n")[0])
    p.add_argument("--embed_size", type=int, default=1024)
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--regions", type=int, default=36)
    p.add_argument("--words", type=int, default=13)
    p.add_argument("--hidden", default="0,512", help="head widths, the first is the baseline")
    p.add_argument("--captions", type=int, default=566_435, help="training captions (default: COCO's)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p = sub.add_parser("recall")
    split_arguments(p, several=True)
    p = sub.add_parser("latency")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--features", required=True)
    p.add_argument("--vocab_path", default=None)
    p.add_argument("--index_dir", required=True)
    p.add_argument("--index_type", default="flat")
    p.add_argument("--queries_file", required=True)
    p.add_argument("--quiet", action="store_true")
    for q in (p, sub.add_parser("latency-worker")):
        if q is not p:
            q.add_argument("--index_dir", required=True)
            q.add_argument("--queries_file", required=True)
        q.add_argument("--queries", type=int, default=30)
        q.add_argument("--k", type=int, default=10)
        q.add_argument("--shortlist", type=int, default=100)
    for q in sub.choices.values():
        q.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    {"eval": run_eval, "sampled": run_sampled, "pairs": run_pairs, "recall": run_recall, "fit-cost": run_fit_cost,
     "latency": run_latency,
     "latency-worker": run_latency_worker}[args.what](args)


if __name__ == "__main__":
    main()
