"""engine/parallel.py: the ordered, bounded pool of decode workers and the stage threads.

What a run relies on: results in input order whatever the workers' timing, at most `depth` items
taken from the source and not yet yielded, the first failure raised where one thread running
the same loop would have raised it, and no thread left behind when the consumer stops early.
"""

from __future__ import annotations

import random
import threading
import time
from contextlib import closing

import pytest

from engine.parallel import POLL_S, Stage, ordered_map


def alive(prefix: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(prefix)]


def wait_gone(prefix: str, timeout: float = 5.0) -> list[threading.Thread]:
    """The threads named `prefix`... still alive after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while alive(prefix) and time.monotonic() < deadline:
        time.sleep(0.01)
    return alive(prefix)


class Counted:
    """A source that counts what was taken from it, and a fn that counts what runs at once."""

    def __init__(self, n: int, *, seed: int = 0, max_sleep: float = 0.004) -> None:
        self.n = n
        self.taken = 0
        self.running = 0
        self.max_running = 0
        self.calls = 0
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._sleeps = [self._rng.uniform(0, max_sleep) for _ in range(n)]

    def source(self):
        for i in range(self.n):
            self.taken += 1
            yield i

    def fn(self, i: int) -> int:
        with self._lock:
            self.calls += 1
            self.running += 1
            self.max_running = max(self.max_running, self.running)
        time.sleep(self._sleeps[i])  # finish out of order
        with self._lock:
            self.running -= 1
        return i * i


@pytest.mark.parametrize("workers", [1, 2, 5])
def test_results_come_in_input_order(workers):
    c = Counted(60, seed=workers)
    assert list(ordered_map(c.fn, c.source(), workers=workers, name="t-order")) == [
        i * i for i in range(60)
    ]
    assert c.max_running <= workers
    assert wait_gone("t-order") == []


@pytest.mark.parametrize(("workers", "depth"), [(1, 1), (2, None), (3, 4), (4, 8)])
def test_items_in_flight_are_bounded_by_depth(workers, depth):
    bound = 2 * workers if depth is None else depth
    c = Counted(40, seed=3)
    most = 0
    for yielded, _ in enumerate(ordered_map(c.fn, c.source(), workers=workers, depth=depth), 1):
        time.sleep(0.003)  # a slow consumer: the pool must wait, not read ahead
        most = max(most, c.taken - yielded)
        assert c.taken - yielded <= bound - 1  # the one just yielded is out of flight
    assert c.max_running <= workers
    # the pool did keep `bound` items in flight (it reads ahead as far as allowed)
    assert most == bound - 1


def test_a_failing_item_raises_after_the_items_before_it():
    def fn(i: int) -> int:
        if i == 7:
            raise RuntimeError("item 7 is bad")
        time.sleep(0.002 * (i % 3))
        return i

    got = []
    with pytest.raises(RuntimeError, match="item 7 is bad"):
        for x in ordered_map(fn, range(30), workers=4, name="t-fail"):
            got.append(x)
    assert got == list(range(7))
    assert wait_gone("t-fail") == []


def test_a_failing_source_raises_after_the_items_taken_before_it():
    def source():
        yield from range(5)
        raise OSError("the archive ends early")

    got = []
    with pytest.raises(OSError, match="ends early"):
        for x in ordered_map(lambda i: -i, source(), workers=3, name="t-src"):
            got.append(x)
    assert got == [0, -1, -2, -3, -4]
    assert wait_gone("t-src") == []


def test_closing_early_stops_the_pool_and_runs_no_more_than_depth_ahead():
    c = Counted(1000, max_sleep=0.01)
    with closing(ordered_map(c.fn, c.source(), workers=3, depth=6, name="t-close")) as results:
        assert [next(results) for _ in range(4)] == [0, 1, 4, 9]
    assert wait_gone("t-close") == []  # closed: running items finished, queued ones cancelled
    assert c.calls <= 4 + 6 and c.taken <= 4 + 6


def test_bad_worker_counts_are_refused():
    for workers, depth in ((0, None), (3, 2)):
        with pytest.raises(ValueError, match="workers"):
            next(ordered_map(abs, [1], workers=workers, depth=depth))


# --------------------------------------------------------------------------- Stage


def test_stage_passes_items_in_order_and_reraises_its_source_error():
    def source():
        yield from range(10)
        raise KeyError("boom")

    stop = threading.Event()
    stage = Stage(source(), stop, name="t-stage")
    got = []
    with pytest.raises(KeyError, match="boom"):
        for x in stage:
            got.append(x)
    assert got == list(range(10))
    assert stage.join(timeout=5)


def test_stage_stops_and_closes_its_source_when_stop_is_set():
    closed = threading.Event()

    def endless():
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed.set()

    stop = threading.Event()
    stage = Stage(endless(), stop, depth=2, name="t-endless")
    it = iter(stage)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    stop.set()  # the consumer leaves; the thread is blocked on a full queue
    assert stage.join(timeout=10 * POLL_S + 5)
    assert closed.is_set()


def test_a_stage_waiting_on_an_idle_source_ends_when_stop_is_set():
    release = threading.Event()

    def slow():
        yield 1
        release.wait(30)  # an upstream stage that never delivers again
        yield 2

    stop = threading.Event()
    upstream = Stage(slow(), stop, name="t-up")
    downstream = Stage(iter(upstream), stop, name="t-down")
    it = iter(downstream)
    assert next(it) == 1
    stop.set()
    # the downstream thread waits on the upstream queue: it must notice `stop`, not hang
    assert downstream.join(timeout=10 * POLL_S + 5)
    release.set()
    assert upstream.join(timeout=5)
