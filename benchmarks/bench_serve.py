"""Load test of `vsl serve` on loopback: 2,000 text queries, 16 concurrent, batched against unbatched.

    python benchmarks/bench_serve.py [--index DIR] [--queries 2000] [--concurrency 16]

Against the demo index (built once and cached in ``--demo_dir``, as ``vsl serve`` with no index
does) unless ``--index`` is given. For every server setting a fresh ``vsl serve`` process is
started on 127.0.0.1 (a free port), warmed up, then sent the queries by ``--concurrency``
concurrent clients (the demo test captions, each query a caption; every one a distinct request).
Settings, compared in the same run:

* unbatched: ``--max_batch 1``, every query its own search call (the baseline);
* batched: ``--max_batch 32`` with the default collection window (``--batch_window_ms 2``);
* batched, no window: ``--batch_window_ms 0``, only queries arriving while both workers are busy
  share a batch;
* batched with a 5 ms window, and with one search thread instead of one per core.

For each: errors (non-200 answers or failed connections; must be 0), latency percentiles as the
client sees them, queries/s, the mean batch size (from ``/api/info``), and the median latency of
``--single`` queries sent one at a time (what the collection window costs an idle server).
The client runs in this process (asyncio + httpx) and shares the CPU with the server, as a local
user's browser would.
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
if importlib.util.find_spec("vsl") is None:      # running from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from common import markdown_table  # noqa: E402

import httpx  # noqa: E402

from vsl.distributed import free_loopback_port  # noqa: E402

SETTINGS = (
    ("unbatched", ["--max_batch", "1"]),
    ("batched, 2 ms window (default)", ["--max_batch", "32", "--batch_window_ms", "2"]),
    ("batched, no window", ["--max_batch", "32", "--batch_window_ms", "0"]),
    ("batched, 5 ms window", ["--max_batch", "32", "--batch_window_ms", "5"]),
    ("batched, 2 ms, 1 worker", ["--max_batch", "32", "--batch_window_ms", "2", "--workers", "1"]),
)


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(q / 100 * (len(ordered) - 1)))))]


def start_server(index: str, extra: List[str], env: Dict[str, str], timeout: float) -> "tuple[subprocess.Popen, str]":
    port = free_loopback_port()
    cmd = [sys.executable, "-m", "vsl", "serve", "--index", index, "--host", "127.0.0.1", "--port", str(port),
           "--log_level", "warning", *extra]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"bench_serve: the server exited with status {proc.returncode}:\n{proc.stdout.read()}")
        try:
            if httpx.get(url + "/api/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"bench_serve: the server did not answer within {timeout:.0f} s")


async def load(url: str, queries: Sequence[str], concurrency: int, k: int, shortlist: int) -> Dict[str, object]:
    """Send every query once, ``concurrency`` at a time; latencies (s) of the successful ones."""
    latencies: List[float] = []
    errors = 0
    position = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        async def worker() -> None:
            nonlocal position, errors
            while position < len(queries):
                q = queries[position]
                position += 1
                t0 = time.perf_counter()
                try:
                    r = await client.get("/api/search", params={"q": q, "k": k, "shortlist": shortlist})
                    ok = r.status_code == 200 and len(r.json()["results"]) == k
                except (httpx.HTTPError, ValueError, KeyError):
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors += 1

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - start
    return {"latencies": latencies, "errors": errors, "seconds": seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--index", default=None, help="index folder (default: the demo index in --demo_dir)")
    parser.add_argument("--demo_dir", default="./vsl-demo", help="demo working folder (built once, cached)")
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--single", type=int, default=100, help="queries sent one at a time per setting")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--shortlist", type=int, default=100)
    parser.add_argument("--settings", default=",".join(str(i) for i in range(len(SETTINGS))),
                        help="comma-separated indices into: " + "; ".join(f"{i} = {name}" for i, (name, _)
                                                                          in enumerate(SETTINGS)))
    parser.add_argument("--startup_timeout", type=float, default=180)
    args = parser.parse_args()

    from vsl.retrieval import Index

    index = args.index
    if index is None:
        from vsl.serve.demo import build_demo_index

        index = str(build_demo_index(args.demo_dir).index_dir)
    gallery = Index.load(index)
    captions = [c for i in range(gallery.num_images) for c in gallery.captions_of_image(i)]
    if not captions:
        raise SystemExit("bench_serve: the index has no captions to use as queries")
    queries = [captions[i % len(captions)] for i in range(args.queries)]
    del gallery
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"),
                                         env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    rows, results = [], {}
    for i in (int(s) for s in args.settings.split(",")):
        name, extra = SETTINGS[i]
        proc, url = start_server(index, extra, env, args.startup_timeout)
        try:
            asyncio.run(load(url, queries[:args.warmup], args.concurrency, args.k, args.shortlist))
            single = asyncio.run(load(url, queries[:args.single], 1, args.k, args.shortlist))
            before = httpx.get(url + "/api/info").json()["server"]
            run = asyncio.run(load(url, queries, args.concurrency, args.k, args.shortlist))
            after = httpx.get(url + "/api/info").json()["server"]
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        lat = run["latencies"]
        batches = after["batches"] - before["batches"]
        results[name] = run
        rows.append([name, f"{len(queries):,}", run["errors"] + single["errors"],
                     *(f"{1e3 * percentile(lat, q):.1f}" for q in (50, 95, 99)),
                     f"{len(lat) / run['seconds']:.1f}",
                     f"{(after['queries'] - before['queries']) / max(1, batches):.1f}",
                     f"{1e3 * statistics.median(single['latencies']):.1f}" if single["latencies"] else "-"])
        print(f"{name}: done", flush=True)
    base = rows[0]
    print(f"\n{len(queries):,} text queries (k={args.k}, shortlist={args.shortlist}), "
          f"{args.concurrency} concurrent clients, loopback, {os.cpu_count()} cores; index {index}\n")
    print(markdown_table(["server", "queries", "errors", "p50 ms", "p95 ms", "p99 ms", "queries/s",
                          "mean batch", "p50 ms, 1 client"], rows))
    if len(rows) > 1:
        for row in rows[1:]:
            print(f"{row[0]}: {float(row[6]) / float(base[6]):.2f}x the queries/s of {base[0]}")
    return 1 if any(r[2] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
