"""``vsl serve``: load an index once, then serve the search page and API with uvicorn on loopback.

:func:`serve` binds the socket itself (so that a port in use is a one-line error, not a uvicorn
exit), loads the :class:`vsl.retrieval.Index` (model, FAISS index, memory-mapped regions) once,
sizes the search thread pool to the cores and gives each search thread an equal share of the
cores for torch's own threads (so that concurrent batches do not oversubscribe the CPU), and runs
the app until interrupted. With no index it serves the demo index (:mod:`vsl.serve.demo`).
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Optional, Union

from ..errors import ConfigError

PathLike = Union[str, os.PathLike]
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8000


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (``port`` 0 = any free port)."""
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port: expected 0 to 65535, got {port}")
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        raise ConfigError(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc})") from None
    sock.listen(2048)
    return sock


def search_threads(workers: Optional[int] = None) -> int:
    """Search threads: ``workers`` or the CPU cores this process may use."""
    if workers is not None and workers < 0:
        raise ConfigError(f"--workers: expected >= 0 (0 = one per core), got {workers}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return workers or cores


def serve(index: Optional[PathLike] = None, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *,
          workers: Optional[int] = None, batch_window_ms: float = 2.0, max_batch: int = 32,
          thumbnails: Optional[PathLike] = None, device: str = "cpu", demo_dir: PathLike = "./vsl-demo",
          log_level: str = "info", admin_token: Optional[str] = None, watch_s: Optional[float] = None) -> None:
    """Serve ``index`` (a folder written by ``vsl index``; None = the demo index) until interrupted."""
    if watch_s is not None and not watch_s >= 0:
        raise ConfigError(f"--watch_s: expected >= 0 (0 = do not follow the index's manifest), got {watch_s}")
    if max_batch < 1:
        raise ConfigError(f"--max_batch: expected >= 1 (1 = no batching), got {max_batch}")
    if not batch_window_ms >= 0:
        raise ConfigError(f"--batch_window_ms: expected >= 0, got {batch_window_ms}")
    threads = search_threads(workers)
    if thumbnails is not None and not Path(thumbnails).is_dir():
        raise ConfigError(f"--thumbnails {thumbnails}: not a folder (expected {{image_id}}.png files)")
    sock = bind(host, port)            # before the slow part: a busy port fails at once
    try:
        import torch
        import uvicorn

        from ..retrieval import Index
        from .app import create_app

        if index is None:
            from .demo import build_demo_index

            index = build_demo_index(demo_dir, device=device).index_dir
        loaded = Index.load(Path(index), device=device)
        # Each search thread runs its batch with its share of the cores.
        torch.set_num_threads(max(1, search_threads() // threads))
        app = create_app(loaded, workers=threads, batch_window_ms=batch_window_ms, max_batch=max_batch,
                         thumbnails=Path(thumbnails) if thumbnails else None,
                         admin_token=admin_token, **({} if watch_s is None else {"watch_s": watch_s}))
        shown = f"[{host}]" if ":" in host else host
        print(f"vsl serve: {index} ({loaded.num_images:,} images) on http://{shown}:{sock.getsockname()[1]}/ "
              f"- API docs at /docs, Ctrl-C stops", flush=True)
        config = uvicorn.Config(app, log_level=log_level, access_log=False, timeout_graceful_shutdown=5)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
