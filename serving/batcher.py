"""Dynamic batching: concurrent requests wait at most `max_wait_s` to share one beam search of up to
`max_batch` users, so throughput grows with load while a lone request pays only the wait."""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Sequence

from serving.engine import Recommendation, Request
from serving.metrics import ServingMetrics
from serving.user_features import UserFeatures
from serving.versions import VersionManager

FeatureReader = Callable[[Sequence[str]], list[UserFeatures]]


@dataclass
class _Pending:
    request: Request
    version: int
    future: Future


class Batcher:
    """One worker thread drains the queue into batches per version and answers their futures."""

    def __init__(self, manager: VersionManager, features: FeatureReader, max_batch: int = 32,
                 max_wait_s: float = 0.002, metrics: ServingMetrics | None = None) -> None:
        self.manager, self.features, self.metrics = manager, features, metrics
        self.max_batch, self.max_wait_s = max_batch, max_wait_s
        self.queue: queue.Queue[_Pending | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="batcher", daemon=True)
        self._thread.start()

    def submit(self, request: Request, version: int) -> Future:
        future: Future = Future()
        self.queue.put(_Pending(request, version, future))
        return future

    def recommend(self, requests: Sequence[Request], version: int, timeout: float = 30.0) -> list[Recommendation]:
        """Answer requests (each joins whatever batch forms) and wait for all of them."""
        futures = [self.submit(r, version) for r in requests]
        return [f.result(timeout=timeout) for f in futures]

    def stop(self) -> None:
        self.queue.put(None)
        self._thread.join(timeout=10)

    def _work(self) -> None:
        while True:
            first = self.queue.get()
            if first is None:
                return
            batch = [first]
            deadline = time.monotonic() + self.max_wait_s
            while len(batch) < self.max_batch:
                try:
                    item = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    self.queue.put(None)
                    break
                batch.append(item)
            for version in sorted({p.version for p in batch}):
                self._run([p for p in batch if p.version == version], version)

    def _run(self, group: list[_Pending], version: int) -> None:
        try:
            served = self.manager.acquire(version)
        except Exception as exc:
            for pending in group:
                pending.future.set_exception(exc)
            return
        try:
            started = time.perf_counter()
            requests, histories = resolve([p.request for p in group], self.features)
            read = time.perf_counter()
            results = served.recommend(requests, histories)
            if self.metrics is not None:
                self.metrics.batch_size.observe(len(group))
                self.metrics.batch_seconds.labels("features").observe(read - started)
                self.metrics.batch_seconds.labels("search").observe(time.perf_counter() - read)
            for pending, result in zip(group, results):
                pending.future.set_result(result)
        except Exception as exc:  # a failed batch fails its requests, never the worker
            for pending in group:
                if not pending.future.done():
                    pending.future.set_exception(exc)
        finally:
            self.manager.release(version)


def resolve(requests: Sequence[Request], features: FeatureReader
            ) -> tuple[list[Request], list[tuple[Sequence[str], Sequence[float]]]]:
    """Each request with its user's stored features: the history (unless the request overrides it)
    and the context, the request's own values winning feature by feature."""
    stored = features([r.user_id for r in requests])
    resolved, histories = [], []
    for request, user in zip(requests, stored):
        if request.history is not None:
            rewards = request.rewards if request.rewards is not None else (1.0,) * len(request.history)
            histories.append((request.history, rewards))
        else:
            histories.append((user.item_ids, user.rewards))
        resolved.append(dataclasses.replace(request, context={**user.context, **request.context})
                        if user.context else request)
    return resolved, histories
