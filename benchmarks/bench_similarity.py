"""Batched SGR/SAF scoring against the published one-caption-at-a-time loop, same weights, same run.

    python benchmarks/bench_similarity.py [--images 64 --captions 64 --repeats 3]

Prints pairs/s of both, the speed-up, the largest score difference, and the achieved GFLOP/s of each
as a fraction of a large float32 matrix product measured in the same run.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import coco_like_lengths, flops_per_pair, markdown_table, matmul_rate, time_it  # noqa: E402

from vsl.models.reference import published_similarity
from vsl.config import Config  # noqa: E402
from vsl.models import build_model  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--captions", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--embed_size", type=int, default=1024)
    p.add_argument("--sim_dim", type=int, default=256)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device("cpu")
    d, s = args.embed_size, args.sim_dim
    lengths = coco_like_lengths(args.captions, seed=1)
    mean_len = float(lengths.float().mean())
    img_emb = torch.nn.functional.normalize(torch.randn(args.images, 36, d), dim=-1)
    cap_emb = torch.nn.functional.normalize(torch.randn(args.captions, int(lengths.max()), d), dim=-1)
    cap_emb = cap_emb * (torch.arange(cap_emb.size(1)) < lengths[:, None]).unsqueeze(-1)
    rate = matmul_rate(device, "fp32", 2048) / 1e9
    rows = []
    pairs = args.images * args.captions
    for module in ("SGR", "SAF"):
        cfg = Config(module_name=module, img_dim=2048, word_dim=300, embed_size=d, sim_dim=s)
        sim = build_model(cfg).sim_enc.eval()
        with torch.inference_mode():
            batched = sim(img_emb, cap_emb, lengths)
            loop = published_similarity(sim, img_emb, cap_emb, lengths)
            diff = float((batched - loop).abs().max())
            t_batched = statistics.median(time_it(lambda: sim(img_emb, cap_emb, lengths), args.repeats))
            t_loop = statistics.median(time_it(lambda: published_similarity(sim, img_emb, cap_emb, lengths),
                                               args.repeats))
        f_pub = flops_per_pair(cfg, mean_len)
        f_bat = flops_per_pair(cfg, mean_len, published=False)
        rows.append([module, "per-caption loop", pairs / t_loop, 1.0, f_pub * pairs / t_loop / 1e9,
                     f_pub * pairs / t_loop / 1e9 / rate, "-"])
        rows.append([module, "batched", pairs / t_batched, t_loop / t_batched, f_bat * pairs / t_batched / 1e9,
                     f_bat * pairs / t_batched / 1e9 / rate, f"{diff:.1e}"])
    print(f"# similarity scoring, {args.images} images x {args.captions} captions, embed {d}, sim {s}, "
          f"36 regions, mean caption length {mean_len:.2f}, {torch.get_num_threads()} threads")
    print(f"# float32 matrix product (2048^3): {rate:.1f} GFLOP/s; medians of {args.repeats} runs")
    print(markdown_table(["model", "scorer", "pairs/s", "speed-up", "GFLOP/s", "of matmul", "max |diff|"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
