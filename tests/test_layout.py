"""tests/ mirrors engine/: every module of engine/ and kernels/ has a test file of its own, in the
folder of its package, named after it (docs/ARCHITECTURE.md, "Where the tests are"); a module
whose name another package also has takes its package's name too (test_eval_metrics.py,
test_stages_gpu.py). kernels/ is tested at the top (test_kernels_nvrtc.py)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def folder_of(module: Path, root: Path) -> Path:
    """Where a module's tests live: tests/ plus its package path below engine/ (kernels/ and
    engine/'s own modules at the top)."""
    parts = module.relative_to(root).parts[1:-1]  # packages below engine/ or kernels/
    if module.relative_to(root).parts[0] == "kernels":
        return root / "tests"
    return root / "tests" / Path(*parts) if parts else root / "tests"


def allowed_names(module: Path) -> set[str]:
    """The file names a module's tests may have: test_NAME.py or test_PACKAGE_NAME.py."""
    name, package = module.stem, module.parent.name
    return {f"test_{name}.py", f"test_{package}_{name}.py"}


def modules_without_tests(root: Path) -> list[str]:
    out = []
    for top in ("engine", "kernels"):
        for module in sorted((root / top).rglob("*.py")):
            if module.name == "__init__.py" or "__pycache__" in module.parts:
                continue
            folder = folder_of(module, root)
            if not any((folder / n).is_file() for n in allowed_names(module)):
                out.append(str(module.relative_to(root)))
    return out


def test_every_module_has_its_own_test_file():
    missing = modules_without_tests(REPO)
    assert missing == [], (
        "modules without a test file of their own (docs/ARCHITECTURE.md): " + ", ".join(missing)
    )


def test_the_check_finds_a_module_without_tests(tmp_path):
    for path in (
        "engine/__init__.py",
        "engine/cli.py",
        "engine/io/__init__.py",
        "engine/io/reader.py",
        "engine/eval/metrics.py",
        "engine/train/metrics.py",
        "kernels/nvrtc.py",
        "tests/test_cli.py",
        "tests/io/test_reader.py",
        "tests/eval/test_eval_metrics.py",
        "tests/test_kernels_nvrtc.py",
    ):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("")
    # train/metrics.py's tests are not where they belong (tests/train/), so it is listed
    (tmp_path / "tests" / "test_train_metrics.py").write_text("")
    assert modules_without_tests(tmp_path) == ["engine/train/metrics.py"]
    (tmp_path / "tests" / "train").mkdir()
    (tmp_path / "tests" / "test_train_metrics.py").rename(
        tmp_path / "tests" / "train" / "test_train_metrics.py"
    )
    assert modules_without_tests(tmp_path) == []
