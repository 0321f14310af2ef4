"""engine/nightly/cli.py: how `cxr runs` words a run's drift record (the command itself runs in
test_nightly.py over real nights)."""

from __future__ import annotations

from engine.nightly.cli import drift_text, drift_word

METRICS = {
    "psi": 0.31234,
    "positive_rate_change": -0.05,
    "embedding_shift": 0.01234,
    "ood_share": 0.125,
    "n_new": 40,
}


def test_drift_text_gives_the_status_the_reference_and_the_figures():
    drift = {"status": "drift", "flagged": ["psi", "ood"], "reference": "r1", "metrics": METRICS}
    assert drift_text(drift) == (
        "[bold red]DRIFT[/] psi, ood vs r1 (psi 0.312, positive rate -0.050, shift 0.0123, "
        "OOD 12.5%; 40 new)"
    )
    no_shift = METRICS | {"embedding_shift": None, "ood_share": None}
    assert drift_text({"status": "ok", "reference": "r1", "metrics": no_shift}) == (
        "ok vs r1 (psi 0.312, positive rate -0.050; 40 new)"
    )
    few = {"status": "too_few_images", "thresholds": {"min_images": 30}, "reference": "r1"}
    assert drift_text(few) == "not judged (fewer than 30 new images) vs r1"
    assert drift_text({"status": "reference"}) == "reference run"
    assert drift_text({"status": "no_new_images"}) == "no new images"
    assert drift_text({"status": "failed", "reason": "[x]"}) == "failed: \\[x]"  # markup escaped
    assert drift_text(None) == "" and drift_text({}) == ""


def test_drift_word_for_the_runs_table():
    assert drift_word({"status": "drift", "flagged": ["psi"]}) == "[bold red]DRIFT[/] psi"
    assert drift_word({"status": "too_few_images"}) == "not judged"
    assert drift_word({"status": "no_new_images"}) == "no new images"
    assert drift_word({"status": "ok"}) == "ok"
    assert drift_word(None) == ""
