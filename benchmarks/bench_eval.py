"""`vsl eval` end to end against the published one-caption-at-a-time scoring loop, same model, same run.

    python benchmarks/bench_eval.py [--images 1000 --captions_per_image 5 --embed_size 64 --sim_dim 32]

Setting of the issue: 1,000 images x 5,000 captions, a small SGR (embed 64, sim 32). A dataset in the
SCAN layout (36 regions x img_dim float32 features, captions with MS-COCO-like lengths) and a
randomly initialised checkpoint are written to a temporary folder; then

* ours: :func:`vsl.evaluate.evaluate` on it, i.e. everything ``vsl eval`` does (checkpoint and
  vocabulary loading, tokenization, encoding, batched scoring, metrics), median of ``--repeats``;
* published: ``SimilarityEncoder.forward_per_caption`` (the published loop over captions) on the
  same embeddings, timed on the first ``--loop_captions`` captions and extrapolated linearly to all
  captions (its cost is the same for every caption of a given length; the subset has COCO-like
  lengths too). Encoding is not counted for the published loop, which favours it.

The largest score difference between the two on the timed subset is printed as a check.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import coco_like_lengths, markdown_table, time_it  # noqa: E402

from vsl.checkpoint import save_checkpoint  # noqa: E402
from vsl.config import Config  # noqa: E402
from vsl.evaluate import encode_split, evaluate, score  # noqa: E402
from vsl.model import build_model  # noqa: E402
from vsl.vocab import Vocabulary  # noqa: E402


def write_dataset(root: Path, images: int, per_image: int, img_dim: int, words: int, seed: int = 0) -> Vocabulary:
    """``root/data/bench_precomp/test_{ims.npy,caps.txt}`` and ``root/vocab/bench_precomp_vocab.json``."""
    rng = np.random.default_rng(seed)
    folder = root / "data" / "bench_precomp"
    folder.mkdir(parents=True)
    feats = np.lib.format.open_memmap(folder / "test_ims.npy", mode="w+", dtype=np.float32,
                                      shape=(images, 36, img_dim))
    for i in range(0, images, 100):                       # in slices: bounded memory for large img_dim
        feats[i:i + 100] = rng.standard_normal((min(100, images - i), 36, img_dim), dtype=np.float32)
    feats.flush()
    del feats
    vocab_words = [f"w{i}" for i in range(words)]
    lengths = coco_like_lengths(images * per_image, seed=seed).numpy() - 2       # words without <start>/<end>
    ids = rng.integers(0, words, size=int(lengths.sum()))
    cut = np.split(ids, np.cumsum(lengths)[:-1])
    (folder / "test_caps.txt").write_text("\n".join(" ".join(vocab_words[i] for i in c) for c in cut) + "\n")
    vocab = Vocabulary(vocab_words)
    vocab.to_json(root / "vocab" / "bench_precomp_vocab.json")
    return vocab


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--captions_per_image", type=int, default=5)
    p.add_argument("--img_dim", type=int, default=2048)
    p.add_argument("--embed_size", type=int, default=64)
    p.add_argument("--sim_dim", type=int, default=32)
    p.add_argument("--module_name", choices=("SGR", "SAF"), default="SGR")
    p.add_argument("--words", type=int, default=1000, help="vocabulary size of the synthetic captions")
    p.add_argument("--loop_captions", type=int, default=100, help="captions timed with the published loop")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n, m = args.images, args.images * args.captions_per_image

    with tempfile.TemporaryDirectory(prefix="bench_eval_") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        vocab = write_dataset(root, n, args.captions_per_image, args.img_dim, args.words)
        config = Config(data_path=str(root / "data"), data_name="bench_precomp", vocab_path=str(root / "vocab"),
                        module_name=args.module_name, img_dim=args.img_dim, word_dim=300,
                        embed_size=args.embed_size, sim_dim=args.sim_dim, vocab_size=len(vocab), device="cpu")
        model = build_model(config).eval()
        ckpt = save_checkpoint(root / "model.pth.tar", model, config)
        print(f"dataset + checkpoint written in {time.perf_counter() - t0:.1f} s; torch threads "
              f"{torch.get_num_threads()}", flush=True)

        def ours():
            return evaluate([ckpt], config.data_path, "test", "full", device="cpu", progress=False)

        t_ours = time_it(ours, repeats=args.repeats, warmup=0)    # minutes per call: no warm-up run

        # Published loop on the same embeddings (from our encoder: identical to the published one).
        captions = (root / "data" / "bench_precomp" / "test_caps.txt").read_text().splitlines()
        images = np.load(root / "data" / "bench_precomp" / "test_ims.npy", mmap_mode="r")
        emb = encode_split(model, images, [vocab.encode(c) for c in captions], progress=False)
        k = min(args.loop_captions, m)
        sub = emb.subset(slice(0, n), slice(0, k))
        with torch.inference_mode():
            t_loop = time_it(lambda: model.sim_enc.forward_per_caption(sub.images, sub.captions, sub.lengths),
                             repeats=args.repeats, warmup=1)
            diff = float((model.sim_enc.forward_per_caption(sub.images, sub.captions, sub.lengths)
                          - score(model, sub)).abs().max())

    ours_s = statistics.median(t_ours)
    loop_s = statistics.median(t_loop) * m / k
    mean_len = float(coco_like_lengths(m).float().mean())
    print(f"\n{args.module_name}, embed {args.embed_size}, sim {args.sim_dim}, img_dim {args.img_dim}: {n:,} images x "
          f"{m:,} captions ({mean_len:.1f} tokens on average), median of {args.repeats} runs")
    print(markdown_table(
        ["path", "captions timed", "seconds for all pairs", "pairs/s", "speed-up"],
        [["published loop (forward_per_caption), scoring only", f"{k:,} (x{m / k:g} extrapolated)", loop_s,
          n * m / loop_s, 1.0],
         ["vsl eval (evaluate(): load, tokenize, encode, score, metrics)", f"{m:,}", ours_s, n * m / ours_s,
          loop_s / ours_s]]))
    print(f"max |score difference| on the timed captions: {diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
