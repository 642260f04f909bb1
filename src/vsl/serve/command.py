"""``vsl serve``: options of :func:`vsl.serve.serve` (one library call)."""
from __future__ import annotations

import argparse


DESCRIPTION = """\
Serve a search page (/) and a JSON API (/api/search, /api/info, /api/health; docs at /docs) over an
index written by `vsl index`. The model and index are loaded once; searches run on a thread pool,
queries arriving within --batch_window_ms of each other share one batched search.

With no --index, serves the demo: builds once (cached in --demo_dir) the demo dataset, an SGR+VSL
model trained with the demo recipe, its shortlist head and the test split's index.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", metavar="DIR", default=None,
                        help="index folder written by `vsl index` (default: the demo index, built once)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (loopback unless told otherwise)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (0 = any free port)")
    parser.add_argument("--workers", type=int, default=0, help="search threads (0 = one per CPU core)")
    parser.add_argument("--batch_window_ms", type=float, default=2.0,
                        help="how long a query waits for others to share its batched search")
    parser.add_argument("--max_batch", type=int, default=32, help="largest batch of queries (1 = no batching)")
    parser.add_argument("--thumbnails", metavar="DIR", default=None,
                        help="folder of {image_id}.png pictures of the gallery (default: the demo's, "
                             "or none)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--demo_dir", metavar="DIR", default="./vsl-demo",
                        help="working folder of the demo index (used without --index)")
    parser.add_argument("--admin_token", default=None,
                        help="enable the admin routes POST /api/reload, /api/add and /api/remove for requests "
                             "that send Authorization: Bearer TOKEN (default: off, they answer 403)")
    parser.add_argument("--watch_s", type=float, default=None, metavar="SECONDS",
                        help="seconds between looks at the index's manifest: a generation another process "
                             "writes (vsl index --add/--remove/--compact) is swapped in (default: 2; 0 = off)")
    parser.add_argument("--log_level", choices=("debug", "info", "warning", "error"), default="info",
                        help="uvicorn's log level")


def run(args: argparse.Namespace) -> int:
    from .server import serve

    serve(args.index, args.host, args.port, workers=args.workers or None, batch_window_ms=args.batch_window_ms,
          max_batch=args.max_batch, thumbnails=args.thumbnails, device=args.device, demo_dir=args.demo_dir,
          log_level=args.log_level, admin_token=args.admin_token, watch_s=args.watch_s)
    return 0
