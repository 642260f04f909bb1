"""`vsl eval` end to end against the published one-caption-at-a-time scoring loop, same model, same run.

    python benchmarks/bench_eval.py [--images 1000 --captions_per_image 5 --embed_size 64 --sim_dim 32]
    python benchmarks/bench_eval.py --device cuda --threads 8     # the same comparison on a GPU

Setting of the issue: 1,000 images x 5,000 captions, a small SGR (embed 64, sim 32). A dataset in the
SCAN layout (36 regions x img_dim float32 features, captions with MS-COCO-like lengths) and a
randomly initialised checkpoint are written to a temporary folder; then

* ours: :func:`vsl.evaluation.evaluate` on it, i.e. everything ``vsl eval`` does (checkpoint and
  vocabulary loading, tokenization, encoding, batched scoring, metrics), median of ``--repeats``;
* published: the published evaluation's ``shard_attn_scores`` (shard_size 100): the matrix in
  100-image x 100-caption shards, each scored by the one-caption-at-a-time loop
  (``vsl.models.reference.published_similarity`` on the shard's 100 images). ``--loop_shards`` shards
  (spread over the matrix) are timed and extrapolated linearly to all shards (every shard does the
  same work for captions of the same lengths). Encoding is not counted for it, which favours it.
  As published, the embeddings stay on the host and each shard is copied to the device and its
  scores back (no-ops on the CPU).

Both are timed for every ``--threads`` setting, interleaved (ours, published, next thread count,
next repeat), and the medians are reported, because other jobs share this machine.
The largest score difference between the two on the timed subset is printed as a check.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
if importlib.util.find_spec("vsl") is None:      # running from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from common import coco_like_lengths, flops_per_pair, markdown_table, matmul_rate, time_it  # noqa: E402

from vsl.models.reference import published_similarity
from vsl.checkpoint import save_checkpoint  # noqa: E402
from vsl.config import Config  # noqa: E402
from vsl.evaluation import encode_split, evaluate, score  # noqa: E402
from vsl.models import build_model  # noqa: E402
from vsl.data.vocab import Vocabulary  # noqa: E402


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
    p.add_argument("--loop_shards", type=int, default=5, help="100x100 shards timed with the published loop")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", default="1,2", help="comma-separated torch thread counts to compare")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (both paths run there)")
    args = p.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")]
    device = torch.device(args.device)
    torch.manual_seed(0)
    n, m = args.images, args.images * args.captions_per_image
    shard = 100

    with tempfile.TemporaryDirectory(prefix="bench_eval_") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        vocab = write_dataset(root, n, args.captions_per_image, args.img_dim, args.words)
        config = Config(data_path=str(root / "data"), data_name="bench_precomp", vocab_path=str(root / "vocab"),
                        module_name=args.module_name, img_dim=args.img_dim, word_dim=300,
                        embed_size=args.embed_size, sim_dim=args.sim_dim, vocab_size=len(vocab), device=args.device)
        model = build_model(config).to(device).eval()
        ckpt = save_checkpoint(root / "model.pth.tar", model, config)
        print(f"dataset + checkpoint written in {time.perf_counter() - t0:.1f} s", flush=True)

        captions = (root / "data" / "bench_precomp" / "test_caps.txt").read_text().splitlines()
        images = np.load(root / "data" / "bench_precomp" / "test_ims.npy", mmap_mode="r")
        emb = encode_split(model, images, [vocab.encode(c) for c in captions], progress=False)
        host = type(emb)(emb.images.cpu(), emb.captions.cpu(), emb.lengths)     # published: numpy on the host
        # Shards spread over the matrix (image shard i, caption shard j), as the published double loop visits them.
        n_img_shards, n_cap_shards = -(-n // shard), -(-m // shard)
        total_shards = n_img_shards * n_cap_shards
        k = min(args.loop_shards, total_shards)
        picks = [(s_ * 7 % n_img_shards, s_ * 13 % n_cap_shards) for s_ in range(k)]

        def published():
            out = []
            for i, j in picks:
                sub = host.subset(slice(i * shard, (i + 1) * shard), slice(j * shard, (j + 1) * shard))
                out.append(published_similarity(model.sim_enc, sub.images.to(device), sub.captions.to(device),
                                                             sub.lengths).cpu())
            return out

        def ours():
            return evaluate([ckpt], config.data_path, "test", "full", device=args.device, progress=False)

        with torch.inference_mode():
            loop_scores = published()
            full = score(model, emb)
        diff = max(float((loop_scores[q] - full[i * shard:(i + 1) * shard, j * shard:(j + 1) * shard]).abs().max())
                   for q, (i, j) in enumerate(picks))
        times = {(t, path): [] for t in threads for path in ("ours", "published")}
        for r in range(args.repeats):
            for t in threads:
                torch.set_num_threads(t)
                times[(t, "ours")].append(time_it(ours, repeats=1, warmup=0, device=device)[0])
                with torch.inference_mode():
                    times[(t, "published")].append(
                        time_it(published, repeats=1, warmup=0, device=device)[0] * total_shards / k)
                print(f"repeat {r + 1}/{args.repeats}, {t} thread(s): ours {times[(t, 'ours')][-1]:.1f} s, "
                      f"published {times[(t, 'published')][-1]:.1f} s (extrapolated)", flush=True)

    mean_len = float(coco_like_lengths(m).float().mean())
    sizes = Config(module_name=args.module_name, embed_size=args.embed_size, sim_dim=args.sim_dim)
    flops = flops_per_pair(sizes, mean_len, published=False) * n * m
    rate = matmul_rate(device, "fp32", 2048) / 1e9
    best_pub = min(statistics.median(times[(t, "published")]) for t in threads)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{os.cpu_count()} CPU cores"
    print(f"\n{args.module_name} on {args.device} ({where}, torch {torch.__version__}), embed {args.embed_size}, sim {args.sim_dim}, img_dim {args.img_dim}: {n:,} images x "
          f"{m:,} captions ({mean_len:.1f} tokens on average); medians of {args.repeats} interleaved runs")
    print(f"published: {k} of {total_shards} 100x100 shards timed, extrapolated x{total_shards / k:g}; "
          f"ours: vsl.evaluation.evaluate end to end (load, tokenize, encode, score, metrics)")
    rows = []
    for t in threads:
        pub, our = statistics.median(times[(t, "published")]), statistics.median(times[(t, "ours")])
        rows.append([t, pub, our, pub / our, best_pub / our, flops / our / 1e9])
    print(markdown_table(["torch threads", "published shards (s)", "vsl eval (s)", "speed-up, same threads",
                          "speed-up vs fastest published", "GFLOP/s (scoring FLOPs / eval time)"], rows))
    print(f"float32 matrix product (2048^3): {rate:.1f} GFLOP/s; scoring needs {flops / 1e12:.2f} TFLOP, i.e. "
          f"{flops / rate / 1e9:.1f} s at that rate")
    print(f"max |score difference| on the timed shards: {diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
