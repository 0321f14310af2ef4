"""The threads of a screening run (engine/screening.py): stages and an ordered pool.

`Stage` iterates a source in a thread of its own behind a bounded queue, so that two steps
overlap (reading batch n+1 while batch n is preprocessed). `ordered_map` runs a function over a
stream of items on a pool of threads (each image's sha256, header, DICOM and decode), so that
the steps that hold one core each (zlib inflate, hashing, NumPy) run side by side.

Both keep a run's memory bounded whatever the archive's size, and both behave, apart from
timing, as the same code run in one thread:

- order: results come in input order;
- bound: a Stage holds at most `depth` results its consumer has not taken; `ordered_map` at most
  `depth` items taken from its source and not yet yielded (running, queued or finished);
- errors: an item's exception is raised when its result is due, after the results before it;
  a source's exception after the items taken before it; a Stage re-raises its source's
  exception in the consumer;
- shutdown: a Stage's thread ends within POLL_S of `stop` being set (`join` waits for it) and
  closes its source; closing `ordered_map`'s generator cancels the items not started and waits
  for the running ones (each one image's work), so no thread outlives the run.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

QUEUE_DEPTH = 2  # results in flight between two stages
POLL_S = 0.1  # how often a waiting thread looks at `stop`


class Stage(Generic[T]):
    """`source` iterated in a daemon thread; iterate the Stage to take its items in order.

    The thread stops when the source ends or fails, or within POLL_S of `stop` being set; then it
    closes the source (a generator's `finally` runs in this thread). Iterating ends quietly once
    `stop` is set: only the run's last consumer sets it, when it no longer takes anything.
    """

    def __init__(
        self,
        source: Iterator[T],
        stop: threading.Event,
        *,
        depth: int = QUEUE_DEPTH,
        name: str = "cxr-stage",
    ) -> None:
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._stop = stop
        self._thread = threading.Thread(target=self._work, args=(source,), daemon=True, name=name)
        self._thread.start()

    def __iter__(self) -> Iterator[T]:
        while True:
            try:
                x = self._queue.get(timeout=POLL_S)
            except queue.Empty:
                if self._stop.is_set():
                    return
                continue
            if x is _DONE:
                return
            if isinstance(x, _Failure):
                raise x.exc
            yield x

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread (set `stop` first, or take every item); True once it ended."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _put(self, x: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(x, timeout=POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _work(self, source: Iterator[T]) -> None:
        try:
            for x in source:
                if not self._put(x):
                    return
            self._put(_DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises
            self._put(_Failure(exc))
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()


def ordered_map(
    fn: Callable[[T], R],
    items: Iterable[T],
    *,
    workers: int,
    depth: int | None = None,
    name: str = "cxr-read",
) -> Generator[R, None, None]:
    """fn(item) for each item, computed on `workers` threads, yielded in input order.

    At most `depth` (default 2 x workers) items are taken from `items` and not yet yielded, so
    with a slow consumer the pool waits instead of reading ahead. `items` is iterated in the
    calling thread. Close the generator (or exhaust it) to shut the pool down.
    """
    depth = 2 * workers if depth is None else depth
    if not 1 <= workers <= depth:
        raise ValueError(f"need 1 <= workers <= depth, not workers={workers}, depth={depth}")
    source = iter(items)
    pending: deque[Future[R]] = deque()
    failure: BaseException | None = None
    exhausted = False
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
    try:
        while True:
            while not exhausted and len(pending) < depth:
                try:
                    item = next(source)
                except StopIteration:
                    exhausted = True
                except BaseException as exc:  # noqa: BLE001 - raised after the items before it
                    failure, exhausted = exc, True
                else:
                    pending.append(pool.submit(fn, item))
            if not pending:
                break
            yield pending.popleft().result()
        if failure is not None:
            raise failure
    finally:
        for future in pending:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


_DONE = object()


@dataclass(frozen=True, slots=True)
class _Failure:
    exc: BaseException
