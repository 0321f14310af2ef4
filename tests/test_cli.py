"""engine.cli: the `cxr` app, `screen` and `similar` with the runner and the search replaced by
stand-ins: options onto ScreenConfig, the exit code of each outcome, --summary-json on success
and on failure, the printed summary's rows and warnings, the progress bar, `similar`'s table and
JSON, and the commands the app mounts. The real runs: test_runner.py, test_screen_e2e.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import plain, run_cli

from engine import cli, runner, similar
from engine.config import ScreenConfig, default_threads
from engine.console import err_console
from engine.errors import ConfigError, EngineError
from engine.io.outdir import write_run_json
from engine.run_record import RunSummary
from engine.similar import Neighbour, SimilarResult


def summary(out: Path, **kw) -> RunSummary:
    base = dict(
        run_id="run123456789",
        out=out,
        backend="onnxruntime",
        model_id="tiny-m",
        trained=True,
        decoder="pillow",
        processed=4,
        ok=4,
        positives=1,
        total_rows=4,
        index_size=4,
        wall_s=2.0,
    )
    return RunSummary(**(base | kw))


@pytest.fixture
def screened(monkeypatch):
    """runner.screen replaced: records the config, writes run.json, returns `result[0]`."""
    calls: list[ScreenConfig] = []
    result: list = []

    def fake(config, *, on_progress=None):
        calls.append(config)
        outcome = result[0]
        if isinstance(outcome, BaseException):
            raise outcome
        write_run_json(config.out, {"run_id": outcome.run_id, "status": "complete"})
        return outcome

    monkeypatch.setattr(runner, "screen", fake)
    return calls, result


def screen(tmp_path, *extra) -> tuple[int, str, str]:
    return run_cli(["screen", tmp_path / "in", "--out", tmp_path / "out", *extra])


# ---------------------------------------------------------------------------------------------
# screen: options and exit codes


def test_options_map_onto_the_config(screened, tmp_path):
    calls, result = screened
    result.append(summary(tmp_path / "out"))
    code, _, _ = screen(
        tmp_path, "--batch-size", "8", "--threshold", "0.3", "--shard-size", "64",
        "--decode-workers", "2", "--no-progress", "--rescreen-changed", "--reference", "abc",
        "--drift-threshold", "psi=0.5", "--fail-on-drift", "--backend", "null",
        "--precision", "fp32", "--embeddings-in-parquet", "--min-side", "40",
    )  # fmt: skip
    assert code == 0
    (c,) = calls
    assert c.inputs == (tmp_path / "in",) and c.out == tmp_path / "out"
    assert (c.batch_size, c.threshold, c.shard_size, c.decode_workers) == (8, 0.3, 64, 2)
    assert (c.progress, c.rescreen_changed, c.reference, c.fail_on_drift) == (
        False, True, "abc", True,
    )  # fmt: skip
    assert c.drift_thresholds.psi == 0.5
    assert (c.backend, c.precision, c.embeddings_in_parquet, c.min_side) == (
        "null",
        "fp32",
        True,
        40,
    )
    assert c.threads == default_threads() and c.models is None and c.ray is None


def test_an_invalid_option_value_is_fatal_and_an_unknown_option_a_usage_error(screened, tmp_path):
    calls, _ = screened
    code, _, stderr = screen(tmp_path, "--batch-size", "0")
    assert code == cli.EXIT_FATAL and "--batch-size" in plain(stderr)
    code, _, _ = screen(tmp_path, "--no-such-option")
    assert code == cli.EXIT_USAGE
    code, _, _ = run_cli(["screen", tmp_path / "in"])  # no --out
    assert code == cli.EXIT_USAGE
    assert calls == []


@pytest.mark.parametrize(
    ("fields", "extra", "code"),
    [
        ({}, [], cli.EXIT_OK),
        ({"errors": 1, "total_errors": 1}, [], cli.EXIT_IMAGE_ERRORS),
        ({"total_errors": 2, "processed": 0, "skipped_existing": 3}, [], cli.EXIT_IMAGE_ERRORS),
        ({"processed": 0, "ok": 0}, [], cli.EXIT_NO_IMAGES),
        ({"interrupted": True, "total_errors": 1}, [], cli.EXIT_INTERRUPTED),
        ({"drift": {"flagged": ["psi"]}}, [], cli.EXIT_OK),
        ({"drift": {"flagged": ["psi"]}, "total_errors": 1}, ["--fail-on-drift"], cli.EXIT_DRIFT),
        ({"drift": {"flagged": []}}, ["--fail-on-drift"], cli.EXIT_OK),
    ],
)
def test_exit_code_of_each_outcome(screened, tmp_path, fields, extra, code):
    _, result = screened
    result.append(summary(tmp_path / "out", **fields))
    got, _, stderr = screen(tmp_path, *extra)
    assert got == code, stderr


def test_summary_json_of_a_finished_run(screened, tmp_path):
    _, result = screened
    result.append(summary(tmp_path / "out", errors=1, total_errors=1))
    target = tmp_path / "nightly" / "summary.json"
    code, _, _ = screen(tmp_path, "--summary-json", target)
    assert code == cli.EXIT_IMAGE_ERRORS
    doc = json.loads(target.read_text())
    assert doc["schema"] == "cxr-run-summary/1" and doc["exit_code"] == 3
    assert doc["run"]["run_id"] == "run123456789" and doc["out"] == str(tmp_path / "out")


@pytest.mark.parametrize(
    ("error", "code", "message"),
    [
        (ConfigError("models not found"), cli.EXIT_FATAL, "models not found"),
        (KeyboardInterrupt(), cli.EXIT_INTERRUPTED, "interrupted"),
    ],
)
def test_summary_json_of_a_run_that_stopped(screened, tmp_path, error, code, message):
    _, result = screened
    result.append(error)
    target = tmp_path / "summary.json"
    got, _, stderr = screen(tmp_path, "--summary-json", target)
    assert got == code
    doc = json.loads(target.read_text())
    assert doc == {
        "schema": "cxr-run-summary/1",
        "out": str(tmp_path / "out"),
        "exit_code": code,
        "error": message,
        "run": None,
    }
    assert message in plain(stderr)


def test_an_unwritable_summary_is_reported_beside_the_error(screened, tmp_path):
    _, result = screened
    result.append(EngineError("the run failed"))
    (tmp_path / "file").write_text("")
    code, _, stderr = screen(tmp_path, "--summary-json", tmp_path / "file" / "s.json")
    assert code == cli.EXIT_FATAL
    text = plain(stderr)
    assert "cannot write the summary" in text and "error: the run failed" in text


# ---------------------------------------------------------------------------------------------
# the printed summary


def test_the_summary_table_and_warnings(screened, tmp_path):
    _, result = screened
    result.append(
        summary(
            tmp_path / "out",
            trained=False,
            processed=13,
            ok=1,
            errors=12,
            error_samples=[f"/in/{i}.png: cannot decode" for i in range(12)],
            total_rows=13,
            total_errors=12,
            index_size=0,
            empty_inputs=["/in/empty"],
            precision_why={"classifier": "int8: parity [ok]"},
            changes={
                "changed": 2,
                "rescreened": 1,
                "rescreen_changed": True,
                "vanished": 3,
                "new_vanished": 1,
                "changed_samples": ["/in/c.png"],
                "vanished_samples": ["/in/v.png"],
            },  # fmt: skip
            drift={"status": "reference"},
        )
    )
    code, stdout, _ = screen(tmp_path)
    assert code == cli.EXIT_IMAGE_ERRORS
    text = plain(stdout)
    assert text.startswith("cxr screen -> /")  # the title, wrapped to the terminal's width
    for row in (
        "backend onnxruntime", "decoder pillow", "models tiny-m UNTRAINED",
        "classifier precision int8: parity [ok]", "screened now 13", "ok 1", "errors 12",
        "positives 1", "images/s 6.5 (2.0 s)", "rows in output / errors 13 / 12",
        "index size 0", "changed since screened 2 (1 rescreened)",
        "vanished since screened 3 (1 new)", "drift reference run",
    ):  # fmt: skip
        assert row in text, row
    assert "error /in/9.png: cannot decode" in text and "/in/10.png" not in text
    assert "... 2 more: rows with status 'error' in" in text
    assert "WARNING: /in/empty holds no image" in text
    assert "the index holds 0 of the 1 screened images: `cxr index rebuild" in text
    assert "WARNING: the models are UNTRAINED" in text
    assert "changed /in/c.png" in text and "vanished /in/v.png" in text
    assert "no images found" not in text and "interrupted" not in text


def test_nothing_found_and_interrupted_say_so(screened, tmp_path):
    _, result = screened
    result.append(summary(tmp_path / "out", processed=0, ok=0, total_rows=0, index_size=0))
    _, stdout, _ = screen(tmp_path)
    assert "WARNING: no images found in INPUT: nothing was screened (exit code 4)" in plain(stdout)
    result[0] = summary(tmp_path / "out", interrupted=True, index_size=2)
    _, stdout, _ = screen(tmp_path)
    text = plain(stdout)
    assert "interrupted: rerun the same command to finish" in text
    assert "cxr index rebuild" not in text  # an interrupted run's index catches up on rerun
    assert "changed since screened" not in text and "drift" not in text  # no nightly records


def test_progress_off_yields_nothing_and_on_counts_errors(monkeypatch):
    with cli._progress(False) as advance:
        assert advance is None
    monkeypatch.setattr(err_console, "quiet", True)
    with cli._progress(True) as advance:
        advance(3)
        advance(2, errors=1)
        advance(1, errors=2)


# ---------------------------------------------------------------------------------------------
# similar


RESULT = SimilarResult(
    query="123",
    query_key=123,
    neighbours=[
        Neighbour(1, 7, 0.98765, "/in/a.tar", "x/[b].png", 0.25, False),
        Neighbour(2, 8, 0.5, "/in/c.png", None, None, None),
    ],
)


@pytest.fixture
def searched(monkeypatch):
    calls = []

    def fake(out, query, *, k, models_dir):
        calls.append((out, query, k, models_dir))
        return RESULT

    monkeypatch.setattr(similar, "similar", fake)
    return calls


def test_similar_prints_a_table(searched, tmp_path):
    code, stdout, _ = run_cli(["similar", "123", "--out", tmp_path, "-k", "2"])
    assert code == 0
    assert searched == [(tmp_path, "123", 2, None)]
    text = plain(stdout)
    assert "most similar to 123" in text
    assert "1 0.9877 0.250 negative 7 /in/a.tar x/[b].png" in text
    assert "2 0.5000 8 /in/c.png" in text


def test_similar_json(searched, tmp_path):
    code, stdout, _ = run_cli(
        ["similar", "a.png", "--out", tmp_path, "--json", "--models", tmp_path / "m"]
    )
    assert code == 0 and searched[0][3] == tmp_path / "m"
    assert json.loads(stdout) == json.loads(json.dumps(RESULT.to_json()))


def test_similar_errors_exit_1(monkeypatch, tmp_path):
    def fail(*a, **k):
        raise EngineError("no index.usearch")

    monkeypatch.setattr(similar, "similar", fail)
    code, _, stderr = run_cli(["similar", "1", "--out", tmp_path])
    assert code == cli.EXIT_FATAL and "error: no index.usearch" in plain(stderr)


# ---------------------------------------------------------------------------------------------
# the app


def test_the_app_mounts_every_command_and_group():
    commands = {c.name or c.callback.__name__ for c in cli.app.registered_commands}
    assert commands == {"screen", "similar", "evaluate", "bench", "serve", "runs", "build"}
    groups = {g.name for g in cli.app.registered_groups}
    assert groups == {"models", "train", "index", "eval"}
    code, stdout, _ = run_cli(["--help"])
    assert code == 0
    for name in sorted(commands | groups):
        assert name in plain(stdout)
