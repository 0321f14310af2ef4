"""engine.stages.base: StageClock adds up each stage's busy seconds, from several threads."""

from __future__ import annotations

import threading

import pytest

from engine.stages.base import StageClock


def test_stage_clock_sums_per_stage_across_threads():
    clock = StageClock()
    assert clock.seconds == {}

    def work() -> None:
        for _ in range(1000):
            clock.add("segment", 0.001)
            clock.add("classify", 0.002)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert clock.seconds == {
        "segment": pytest.approx(4.0),
        "classify": pytest.approx(8.0),
    }
