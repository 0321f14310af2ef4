"""engine/bench.py: `cxr bench` checks its options before measuring anything, and says what it
needs when the package runs without the benchmarks/ folder of a checkout. The measurements
themselves are tested in test_benchmarks.py."""

from __future__ import annotations

import typer
from typer.testing import CliRunner

from engine import bench as bench_module
from engine.bench import bench


def bench_app() -> typer.Typer:
    app = typer.Typer()
    app.command()(bench)
    return app


def test_cxr_bench_command_rejects_bad_options():
    import typer
    from typer.testing import CliRunner

    from engine.bench import bench

    app = typer.Typer()
    app.command()(bench)
    result = CliRunner().invoke(app, ["--batch-size", "0", "--configs", "naive"])
    assert result.exit_code == 1
    assert "--batch-size" in result.stderr
    result = CliRunner().invoke(app, ["--decoder", "magic"])
    assert result.exit_code == 1 and "--decoder" in result.stderr


def test_malformed_option_lists_are_refused_before_any_run(tmp_path):
    runner = CliRunner()
    for args, message in (
        (["--batch-size", "4,x"], "--batch-size takes a comma list of integers, not '4,x'"),
        (["--thread-split", "2-2"], "--thread-split wants DECODE:ORT pairs like 1:2, not '2-2'"),
        (["--configs", "naive,magic"], "--configs takes"),
        (["--archive", str(tmp_path / "missing")], "does not exist"),
    ):
        result = runner.invoke(bench_app(), args)
        assert result.exit_code == 1, (args, result.output)
        assert message in " ".join(result.stderr.split()), args
    assert not (tmp_path / "missing").exists()


def test_without_a_checkout_the_command_says_what_it_needs(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_module, "CHECKOUT", tmp_path)
    result = CliRunner().invoke(bench_app(), [])
    assert result.exit_code == 1
    text = " ".join(result.stderr.split())
    assert f"needs the benchmarks/ folder of a source checkout (looked in {tmp_path})" in text
    assert "pip install -e ." in text
