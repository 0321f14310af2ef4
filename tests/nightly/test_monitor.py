"""engine.nightly.monitor: the runs a directory recorded, and --reference resolved to one of them
(the whole nightly sequence, drift included, is test_nightly.py)."""

from __future__ import annotations

import pytest

from engine.errors import ConfigError
from engine.nightly.monitor import known_runs, resolve_run

RUN_JSON = {
    "run_id": "20240603-abc",
    "history": [{"run_id": "20240601-aaa"}, {"run_id": "20240602-aab"}, {"run_id": None}, {}],
}


def test_known_runs_oldest_first_without_gaps():
    assert known_runs(RUN_JSON) == ["20240601-aaa", "20240602-aab", "20240603-abc"]
    assert known_runs(None) == [] and known_runs({}) == []
    assert known_runs({"run_id": "only"}) == ["only"]


def test_a_run_is_named_whole_or_by_a_prefix_of_exactly_one():
    ids = known_runs(RUN_JSON)
    assert resolve_run(ids, "20240602-aab") == "20240602-aab"
    assert resolve_run(ids, "20240603") == "20240603-abc"
    with pytest.raises(ConfigError, match=r"'2024060' matches several runs: 20240601-aaa, "):
        resolve_run(ids, "2024060")
    with pytest.raises(ConfigError, match=r"--reference 'zzz': no such run.*`cxr runs OUT`"):
        resolve_run(ids, "zzz")
    with pytest.raises(ConfigError, match=r"--show '': no such run"):
        resolve_run(ids, "", what="--show")
