"""A gallery that grows: ``vsl index --add`` against rebuilding (issue 21, part 1).

    python benchmarks/bench_grow.py --images 100000 --add 1000 --work /tmp/grow-bench
    python benchmarks/bench_grow.py --tiny            # seconds; what tests/test_benchmarks.py runs

On demo data (``make-demo-data`` sizes: 36 regions x 128 dims, 5 captions per image) and a model of
the demo recipe's sizes with a shortlist head (random weights: encoding costs what a trained
model's does), it measures, in one run:

* ``build``: ``vsl index`` of the test split (``--images`` images), the gallery to grow;
* ``add``: ``vsl index --add`` of the dev split (``--add`` images) to it;
* ``rebuild`` (the baseline): a fresh ``vsl index`` of a split holding both, what one would run
  without ``--add``; the add's cost is reported as a fraction of it;
* ``add again``: the same add run a second time (it finds its generation and does nothing);

and then checks that the grown index searches like the rebuilt one: text queries (captions of the
added images and of old ones) and image queries, K = 10 from a shortlist of 100, the same ids
(ties of repeated captions aside) and scores within float16 rounding.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
if importlib.util.find_spec("vsl") is None:      # running from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import markdown_table  # noqa: E402

TINY = {"images": 200, "add": 20, "queries": 20}
#: float16 storage of two builds of the same image: scores agree to its rounding.
TOLERANCE = 2e-3
COPY_BLOCK = 8192


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=100_000, help="images of the gallery to grow")
    parser.add_argument("--add", type=int, default=1_000, help="images added to it")
    parser.add_argument("--queries", type=int, default=200, help="text queries compared (and images / 4)")
    parser.add_argument("--index_type", default="flat", help="FAISS index type (vsl index --index_type)")
    parser.add_argument("--work", default=None, help="working folder (default: a temporary one, removed)")
    parser.add_argument("--json", default=None, help="write the rows here")
    parser.add_argument("--tiny", action="store_true", help=f"toy sizes {TINY}")
    args = parser.parse_args(argv)
    if args.tiny:
        for key, value in TINY.items():
            setattr(args, key, value)
    return args


def make_data(work: Path, images: int, add: int):
    """Demo data with ``images`` test and ``add`` dev images, a split ``both`` (test then dev), and a
    random model of the demo recipe's sizes with a shortlist head."""
    import torch

    from vsl.checkpoint import save_checkpoint
    from vsl.config import DEMO_RECIPE, Config
    from vsl.data import demo as dd
    from vsl.models import build_model

    info = dd.make_demo_data(work / "data", dd.DemoSpec(seed=0, train_images=1, dev_images=add, test_images=images),
                             thumbnails=False)
    folder = Path(info["data_path"]) / info["data_name"]
    test, dev = np.load(folder / "test_ims.npy", mmap_mode="r"), np.load(folder / "dev_ims.npy", mmap_mode="r")
    both = np.lib.format.open_memmap(folder / "both_ims.npy", mode="w+", dtype=test.dtype,
                                     shape=(len(test) + len(dev),) + test.shape[1:])
    for lo in range(0, len(test), COPY_BLOCK):
        hi = min(len(test), lo + COPY_BLOCK)
        both[lo:hi] = test[lo:hi]
    both[len(test):] = dev
    both.flush()
    del both
    (folder / "both_caps.txt").write_text((folder / "test_caps.txt").read_text() + (folder / "dev_caps.txt").read_text())
    sizes = {k: DEMO_RECIPE[k] for k in ("word_dim", "embed_size", "sim_dim", "sgr_step")}
    config = Config(data_name=info["data_name"], data_path=info["data_path"], vocab_path=info["vocab_path"],
                    vocab_size=info["vocab_size"], img_dim=128, shortlist_dim=128, **sizes)
    torch.manual_seed(0)
    checkpoint = work / "model_shortlist.pth.tar"
    save_checkpoint(checkpoint, build_model(config), config=config)
    return info, checkpoint


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def compare(grown, fresh, queries, image_ids) -> dict:
    """Hits of both indexes for the same queries: ids (ties aside) and the largest score difference."""
    diffs, same, compared = [], 0, 0
    for name, run in (("text", lambda ix: ix.search_text(queries, k=10, shortlist=100)),
                      ("image", lambda ix: ix.search_image(image_ids, k=10, shortlist=100))):
        for a, b in zip(run(grown), run(fresh)):
            sa, sb = np.array([h.score for h in a.hits]), np.array([h.score for h in b.hits])
            diffs.append(float(np.abs(sa - sb).max()))
            # A rank whose score another hit (or the last, whose twin may be the one cut off) shares is a tie.
            alone = ((np.abs(sa[:, None] - sa[None, :]) <= 1e-6).sum(1) == 1) & (np.abs(sa - sa[-1]) > 1e-6)
            ids_a = [h.id for h, keep in zip(a.hits, alone) if keep]
            ids_b = [h.id for h, keep in zip(b.hits, alone) if keep]
            compared += 1
            same += ids_a == ids_b
    return {"queries": compared, "same_ids": same, "max_score_diff": max(diffs)}


def main(argv=None):
    from vsl.retrieval import Index, build_index
    from vsl.retrieval.append import add_to_index

    args = parse_args(argv)
    import tempfile
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="vsl-grow-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        (info, checkpoint), seconds = timed(lambda: make_data(work, args.images, args.add))
        print(f"demo data: {args.images:,} + {args.add:,} images in {seconds:.1f} s", flush=True)
        kw = dict(data_name=info["data_name"], vocab_path=info["vocab_path"], device="cpu", progress=False,
                  index_type=args.index_type)
        for name in ("grown", "fresh"):
            shutil.rmtree(work / name, ignore_errors=True)
        _, t_build = timed(lambda: build_index(checkpoint, info["data_path"], "test", work / "grown", **kw))
        added, t_add = timed(lambda: add_to_index(work / "grown", checkpoint, info["data_path"], "dev", progress=False,
                                                  device="cpu"))
        again, t_again = timed(lambda: add_to_index(work / "grown", checkpoint, info["data_path"], "dev",
                                                    progress=False, device="cpu"))
        _, t_rebuild = timed(lambda: build_index(checkpoint, info["data_path"], "both", work / "fresh", **kw))
        assert added.images == args.add and again.already
        grown, fresh = Index.load(work / "grown"), Index.load(work / "fresh")
        rng = np.random.default_rng(0)
        new_images = rng.choice(np.arange(args.images, args.images + args.add), args.queries // 2)
        old_images = rng.choice(args.images, args.queries - len(new_images))
        images = np.concatenate([new_images, old_images])
        queries = [grown.captions_of_image(int(i))[0] for i in images]
        check = compare(grown, fresh, queries, [int(i) for i in images[::4]])
        n = args.images + args.add
        rows = [
            {"step": "build (gallery to grow)", "images": args.images, "seconds": t_build, "vs_rebuild": t_build / t_rebuild},
            {"step": "add", "images": args.add, "seconds": t_add, "vs_rebuild": t_add / t_rebuild},
            {"step": "add again (nothing to do)", "images": 0, "seconds": t_again, "vs_rebuild": t_again / t_rebuild},
            {"step": "rebuild (baseline)", "images": n, "seconds": t_rebuild, "vs_rebuild": 1.0},
        ]
        print(markdown_table(["step", "images", "seconds", "x rebuild"],
                             [[r["step"], f"{r['images']:,}", f"{r['seconds']:.2f}", f"{r['vs_rebuild']:.4f}"]
                              for r in rows]))
        print(f"grown vs rebuilt, K = 10 of a shortlist of 100: {check['same_ids']} of {check['queries']} queries "
              f"with the same ids (ties aside), largest score difference {check['max_score_diff']:.2e} "
              f"(float16 rounding: {TOLERANCE:.0e}); index type {args.index_type}")
        result = {"rows": rows, "check": check, "index_type": args.index_type}
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        return result
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
