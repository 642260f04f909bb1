"""The admin routes of ``vsl serve``: a new generation of the index swapped in without dropping a request.

``POST /api/reload`` loads the index folder's newest generation; ``POST /api/add`` and ``POST
/api/remove`` write one (:func:`vsl.retrieval.append.add_to_index`,
:func:`vsl.retrieval.grow.remove_images`) and swap it in. All three need ``--admin_token`` (off:
403) and the header ``Authorization: Bearer TOKEN`` (wrong or missing: 401). Writes run one at a
time on their own thread, so searches keep their workers; a second writer (this server or a
``vsl index`` command) is answered 409. A swap is one reference assignment: a request finishes on
the :class:`~vsl.retrieval.Index` it started with. :class:`Swapper` also follows the manifest: when
another process writes a generation, the server loads it within ``watch_s`` seconds.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional

from fastapi import FastAPI, Request
from pydantic import BaseModel, Field

from ..errors import VSLError

log = logging.getLogger("vsl.serve")
#: Seconds between two looks at the index's manifest (0 = the server does not follow it).
WATCH_S = 2.0


class AddRequest(BaseModel):
    """What to add: a split of a data folder on the server, or a folder of feature files."""

    data_path: Optional[str] = Field(None, description="data folder (SCAN layout) on the server")
    split: str = Field("test", description="split of data_path to add")
    features: Optional[str] = Field(None, description="folder of N x regions x dim .npy files on the server")


class RemoveRequest(BaseModel):
    ids: List[int] = Field(..., description="image ids to hide from search", min_length=1)


def _stamp(index) -> Optional[tuple]:
    """What changes when a writer replaces the manifest (its inode, by the atomic rename)."""
    path = getattr(index, "path", None)
    try:
        st = (Path(path) / "manifest.json").stat() if path is not None else None
    except OSError:
        return None
    return None if st is None else (st.st_ino, st.st_mtime_ns, st.st_size)


class Swapper:
    """Loads and swaps in new generations of ``app.state.index``, one at a time."""

    def __init__(self, app: FastAPI, watch_s: float = WATCH_S):
        self.app, self.watch_s = app, watch_s
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vsl-admin")
        self.lock: Optional[asyncio.Lock] = None
        self.seen = _stamp(app.state.index)

    async def run(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` on the writer thread."""
        return await asyncio.get_running_loop().run_in_executor(self.writer, lambda: fn(*args, **kwargs))

    async def swap(self) -> Dict[str, int]:
        """Load the newest generation and make it the one new requests search."""
        self.lock = self.lock or asyncio.Lock()
        async with self.lock:
            old = self.app.state.index
            stamp = _stamp(old)
            new = await self.run(old.reload)
            self.app.state.index, self.seen = new, stamp
            return {"generation": int(new.generation), "previous": int(old.generation)}

    async def watch(self) -> None:
        """Swap in every generation another process writes (until cancelled)."""
        while True:
            await asyncio.sleep(self.watch_s)
            stamp = _stamp(self.app.state.index)
            if stamp is not None and stamp != self.seen:
                try:
                    result = await self.swap()
                    log.info("index generation %(generation)d loaded (was %(previous)d)", result)
                except VSLError as exc:          # a writer's files not all there yet: the next look retries
                    log.warning("index not reloaded: %s", " ".join(str(exc).split()))

    def close(self) -> None:
        self.writer.shutdown(wait=False, cancel_futures=True)


def add_admin_routes(app: FastAPI, swapper: Swapper, token: Optional[str], error) -> None:
    """The reload, add and remove routes; ``error(parameter, message, status)`` makes the 4xx answers."""

    def check(request: Request) -> None:
        if token is None:
            raise error("token", "admin routes are off (start vsl serve with --admin_token)", 403)
        sent = request.headers.get("authorization", "")
        if not hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
            raise error("token", "wrong or missing admin token (send Authorization: Bearer TOKEN)", 401)

    async def write(fn, *args, **kwargs):
        from ..retrieval import IndexBusy

        try:
            return await swapper.run(fn, *args, **kwargs)
        except IndexBusy as exc:
            raise error("index", " ".join(str(exc).split()), 409) from None
        except VSLError as exc:
            raise error("index", " ".join(str(exc).split()), 422) from None

    @app.post("/api/reload", summary="load the newest generation of the index folder and swap it in")
    async def reload(request: Request) -> Dict[str, Any]:
        check(request)
        return await swapper.swap()

    @app.post("/api/remove", summary="hide images from search in a new generation (admin)")
    async def remove(body: RemoveRequest, request: Request) -> Dict[str, Any]:
        from ..retrieval import remove_images

        check(request)
        before = int(app.state.index.generation)
        await write(remove_images, app.state.index.path, body.ids)
        return {**await swapper.swap(), "previous": before, "removed": len(set(body.ids))}

    @app.post("/api/add", summary="append a split or a features folder in a new generation (admin)")
    async def add(body: AddRequest, request: Request) -> Dict[str, Any]:
        from ..retrieval import add_to_index

        check(request)
        if (body.data_path is None) == (body.features is None):
            raise error("features", "give either data_path (with split) or features", 422)
        index = app.state.index
        before = int(index.generation)
        done = await write(add_to_index, index.path, index.manifest["checkpoint"], body.data_path, body.split,
                           features=body.features, progress=False, device=str(index.device))
        swapped = await swapper.swap()          # the watcher may have swapped it in already
        return {**swapped, "previous": before, "images": done.images, "captions": done.captions, "first_image": done.first_image,
                "already": done.already}
