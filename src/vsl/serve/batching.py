"""Micro-batching of search queries: queries that arrive together run as one batched search call.

:class:`QueryBatcher` sits between the web handlers (on the event loop) and the index (on a thread
pool sized to the cores). A query joins the open group of queries with the same direction, ``k``
and ``shortlist``; a group is dispatched as one ``Index.search_text`` / ``search_image`` call when
its collection window has passed and a worker is free, or at once when it is full. While every
worker is busy, arriving queries keep collecting, so batches grow with the load and an idle server
adds no more than the window to a query's latency. ``max_batch=1`` turns batching off (every
query its own call), the baseline of ``benchmarks/bench_serve.py``.

Batches run concurrently whatever their ``k`` and ``shortlist``: the index passes the search depth
of an approximate FAISS index to each call (:func:`vsl.retrieval.faiss_index.search_parameters`),
so concurrent calls cannot disturb each other. Groups start oldest first.
"""
from __future__ import annotations

import asyncio
from collections import deque
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, Hashable, List, Optional, Sequence, Tuple

from ..errors import VSLError

#: A batched search: (queries, k, shortlist) -> one result per query.
SearchFn = Callable[[List[Any], int, int], Sequence[Any]]


@dataclass
class _Group:
    key: Hashable
    search: SearchFn
    k: int
    shortlist: int
    opened: float
    queries: List[Any] = field(default_factory=list)
    futures: List["asyncio.Future[Tuple[Any, int]]"] = field(default_factory=list)


class QueryBatcher:
    """Collects queries for ``window_s`` seconds (at most ``max_batch``) and runs them on ``executor``.

    ``submit`` returns ``(result, batch_size)``; a user error raised for one query of a batch
    (:class:`vsl.errors.VSLError`) is re-raised for that query only (the batch is then retried query
    by query, so that the others still get their results).
    """

    def __init__(self, executor: Executor, workers: int, window_s: float = 0.002, max_batch: int = 32):
        if workers < 1 or max_batch < 1 or not window_s >= 0:
            raise ValueError("workers and max_batch must be >= 1 and window_s >= 0")
        self.executor, self.workers = executor, workers
        self.window_s, self.max_batch = window_s, max_batch
        self._pending: Deque[_Group] = deque()        # oldest first
        self._filling: Dict[Hashable, _Group] = {}   # the group that new queries of a key join
        self._busy = 0
        self._timer: Optional[asyncio.TimerHandle] = None
        self.batches = 0                              # counters for /api/info and the benchmark
        self.queries = 0

    async def submit(self, key: Hashable, search: SearchFn, query: Any, k: int, shortlist: int) -> Tuple[Any, int]:
        loop = asyncio.get_running_loop()
        group = self._filling.get(key)
        if group is None:
            group = self._filling[key] = _Group(key, search, k, shortlist, loop.time())
            self._pending.append(group)
        future: "asyncio.Future[Tuple[Any, int]]" = loop.create_future()
        group.queries.append(query)
        group.futures.append(future)
        if len(group.queries) >= self.max_batch:
            del self._filling[key]                    # full: the next query of this key opens a new one
        self._dispatch(loop)
        return await future

    # -- scheduling (event-loop thread only, so no locks) ----------------------------------------
    def _dispatch(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the groups that are due (full, or open for ``window_s``) while workers are free."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        now = loop.time()
        for group in list(self._pending):
            if self._busy >= self.workers:
                return                                # a finishing batch calls _dispatch again
            if len(group.queries) < self.max_batch and now < group.opened + self.window_s:
                continue                              # still collecting
            self._pending.remove(group)
            if self._filling.get(group.key) is group:
                del self._filling[group.key]
            self._start(loop, group)
        # Wake up when the next group's window closes; groups already due wait for a running batch,
        # whose completion dispatches again.
        due = [g.opened + self.window_s for g in self._pending if g.opened + self.window_s > now]
        if due:
            self._timer = loop.call_at(min(due), self._dispatch, loop)

    def _start(self, loop: asyncio.AbstractEventLoop, group: _Group) -> None:
        self._busy += 1
        self.batches += 1
        self.queries += len(group.queries)
        task = loop.run_in_executor(self.executor, _run_group, group.search, list(group.queries),
                                    group.k, group.shortlist)

        def done(task: "asyncio.Future[List[Tuple[bool, Any]]]") -> None:
            self._busy -= 1
            outcomes = task.result()                  # _run_group never raises
            for future, (ok, value) in zip(group.futures, outcomes):
                if future.done():                     # the client went away
                    continue
                if ok:
                    future.set_result((value, len(group.queries)))
                else:
                    future.set_exception(value)
            self._dispatch(loop)

        task.add_done_callback(done)


def _run_group(search: SearchFn, queries: List[Any], k: int, shortlist: int) -> List[Tuple[bool, Any]]:
    """One batched call (on a worker thread); per-query outcomes ``(ok, result or exception)``."""
    try:
        results = list(search(queries, k, shortlist))
        return [(True, r) for r in results]
    except VSLError as exc:
        if len(queries) == 1:
            return [(False, exc)]
    except Exception as exc:                                 # a bug: every query of the batch fails
        return [(False, exc)] * len(queries)
    # A user error in a batch: find the query it belongs to by running them one at a time.
    return [outcome for q in queries for outcome in _run_group(search, [q], k, shortlist)]
