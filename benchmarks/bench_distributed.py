"""Training step time of N data-parallel processes against 1 process on the same global batch.

    python benchmarks/bench_distributed.py [--world 2 --batch 32 --steps 6 --module SGR]

One training step = encode, score the global batch (:class:`vsl.distributed.GlobalBatchScorer`,
DDP with Gloo on CPU), VSLObjective (triplet + VSL), backward, gradient clipping, Adam step, on the
same global batches and initial weights in three set-ups:

* ``world`` processes with ``--threads`` threads each (loopback Gloo): the distributed step;
* 1 process with ``--threads`` threads on the whole batch (what one rank has on its own);
* 1 process with ``world x --threads`` threads on the whole batch (the same cores as the
  distributed run): the baseline.

The three are interleaved step by step inside the same run (rank 0 runs the single-process steps
while the other ranks wait in a barrier), so that a change of machine load affects them alike.
Step times are medians over ``--steps`` steps after ``--warmup``; a distributed step is the
slowest rank's time. Dropout is off, so the single-process and distributed losses must agree at
every step (checked and printed). On GPUs the same code runs with NCCL
(``torchrun --nproc_per_node N -m vsl train``).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import coco_like_lengths, markdown_table  # noqa: E402

from vsl import distributed as vdist  # noqa: E402
from vsl.config import Config  # noqa: E402
from vsl.losses import VSLObjective  # noqa: E402
from vsl.models import build_model  # noqa: E402


def make_config(args) -> Config:
    return Config(module_name=args.module, img_dim=args.img_dim, word_dim=args.word_dim, embed_size=args.embed_size,
                  sim_dim=args.sim_dim, vocab_size=1000, num_regions=args.regions, batch_size=args.batch)


def global_batch(args, step: int):
    """Deterministic global batch ``step``: images, captions, lengths, semantic matrix (B, B)."""
    g = torch.Generator().manual_seed(1000 + step)
    lengths = coco_like_lengths(args.batch, seed=step)
    images = torch.randn(args.batch, args.regions, args.img_dim, generator=g)
    captions = torch.randint(4, 1000, (args.batch, int(lengths.max())), generator=g)
    captions = captions * (torch.arange(captions.size(1)) < lengths[:, None])
    semantic = torch.rand(args.batch, args.batch, generator=g)
    return images, captions, lengths, (semantic + semantic.t()) / 2


class Run:
    """One model + optimizer stepping on (a slice of) the global batches."""

    def __init__(self, args, info: vdist.DistInfo):
        torch.manual_seed(0)
        self.model = build_model(make_config(args)).train()
        for module in self.model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
        self.scorer = vdist.wrap_model(self.model, info)
        self.objective = VSLObjective(vsl_weight=args.vsl_weight)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=2e-4)
        per = args.batch // info.world_size
        self.rows = slice(info.rank * per, (info.rank + 1) * per)

    def step(self, batch) -> tuple:
        """(wall seconds, CPU seconds of this process, loss) of one training step."""
        images, captions, lengths, semantic = batch
        images, captions, lengths = images[self.rows], captions[self.rows], lengths[self.rows]
        captions = captions[:, :int(lengths.max())]
        t0, c0 = time.perf_counter(), time.process_time()
        self.optimizer.zero_grad()
        loss = self.objective(self.scorer(images, captions, lengths), semantic)["loss"]
        loss.backward()
        nn.utils.clip_grad_norm_(self.model.parameters(), 2.0)
        self.optimizer.step()
        return time.perf_counter() - t0, time.process_time() - c0, loss.item()


def _rank_main(rank: int, args, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(args.world), LOCAL_RANK=str(rank))
    torch.set_num_threads(args.threads)
    info = vdist.setup_distributed("cpu")
    try:
        distributed = Run(args, info)
        singles = {t: Run(args, vdist.DistInfo()) for t in (args.threads, args.world * args.threads)} \
            if info.is_main else {}
        times = {"dist": [], **{t: [] for t in singles}}
        cpu = {"dist": [], **{t: [] for t in singles}}
        losses = {"dist": [], **{t: [] for t in singles}}
        for step in range(args.warmup + args.steps):
            batch = global_batch(args, step)
            vdist.barrier()
            seconds, cpu_seconds, loss = distributed.step(batch)
            slowest = torch.tensor([seconds, cpu_seconds], dtype=torch.float64)
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            results = {"dist": (*slowest.tolist(), loss)}
            for threads, run in singles.items():        # rank 0 only; the others wait below
                torch.set_num_threads(threads)
                results[threads] = run.step(batch)
            torch.set_num_threads(args.threads)
            vdist.barrier()
            for key, (seconds, cpu_seconds, loss) in results.items():
                losses[key].append(loss)
                if step >= args.warmup:
                    times[key].append(seconds)
                    cpu[key].append(cpu_seconds)
        if info.is_main:
            torch.save({"times": times, "cpu": cpu, "losses": losses}, out)
    finally:
        vdist.cleanup()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=2, help="processes of the distributed run")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--batch", type=int, default=64, help="global batch size (divisible by --world)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--module", choices=("SGR", "SAF"), default="SGR")
    p.add_argument("--img_dim", type=int, default=512)
    p.add_argument("--word_dim", type=int, default=128)
    p.add_argument("--embed_size", type=int, default=256)
    p.add_argument("--sim_dim", type=int, default=64)
    p.add_argument("--regions", type=int, default=36)
    p.add_argument("--vsl_weight", type=float, default=10.0)
    args = p.parse_args(argv)
    if args.batch % args.world:
        p.error(f"--batch {args.batch} must be divisible by --world {args.world}")

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank0.pt")
        mp.start_processes(_rank_main, args=(args, vdist.free_loopback_port(), out), nprocs=args.world, join=True,
                           start_method="spawn")
        result = torch.load(out, weights_only=True)
    times, losses = result["times"], result["losses"]
    med = {k: statistics.median(v) for k, v in times.items()}
    cpu = {k: statistics.median(v) for k, v in result["cpu"].items()}
    few, many = args.threads, args.world * args.threads
    rows = [[name, threads, med[key], cpu[key], med[many] / med[key], med[few] / med[key], cpu[key] / cpu[few]]
            for name, threads, key in (("1 process (baseline, same cores)", many, many), ("1 process", few, few),
                                       (f"{args.world} processes (Gloo)", f"{args.world} x {few}", "dist"))]
    print(f"{args.module}, global batch {args.batch}, embed {args.embed_size}, sim {args.sim_dim}, "
          f"img_dim {args.img_dim}, {args.regions} regions, VSL weight {args.vsl_weight}; median of "
          f"{args.steps} interleaved steps after {args.warmup} warm-up; {os.cpu_count()} CPU cores, "
          f"torch {torch.__version__}")
    print(markdown_table(["run", "threads", "step (s)", "CPU s / process", f"speed-up vs 1 proc x {many} thr",
                          f"speed-up vs 1 proc x {few} thr", f"CPU work / process vs 1 proc x {few} thr"], rows))
    print("CPU s / process: CPU time of the busiest process per step (load-independent measure of the "
          "work each process does; with several threads it includes their spin-waits).")
    def gap(a, b):
        return max(abs(x - y) for x, y in zip(losses[a], losses[b]))
    print(f"losses of {len(losses['dist'])} steps (first {losses['dist'][0]:.6g}, last {losses['dist'][-1]:.6g}): "
          f"distributed vs 1 process x {few} thr differ by <= {gap('dist', few):.2e}; for scale, 1 process "
          f"x {few} thr vs x {many} thr (same code, other float summation order) by <= {gap(few, many):.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
