"""Shared fixtures: the real data set, exported models, and ways to run the `cxr` command.

The real CXRs live in ``shared/data`` beside the repository checkout (``<repo>/../shared/data``);
set ``CXR_DATA`` to point elsewhere. Tests that need the data skip with the reason when it is
missing. Everything a test writes goes under pytest's tmp directories.
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

REPO = Path(__file__).resolve().parents[1]


def data_dir() -> Path:
    """The real-data folder: $CXR_DATA, else ../shared/data next to the repository root."""
    env = os.environ.get("CXR_DATA")
    return Path(env).expanduser().resolve() if env else REPO.parent / "shared" / "data"


DATA = data_dir()
DEV_IMAGES = DATA / "cxr-dev" / "images"
_NO_DATA = (
    f"real CXR data not found at {DEV_IMAGES}: check out shared/ beside the repository "
    "or set CXR_DATA to the folder holding cxr-dev/"
)


def require_data() -> Path:
    """DEV_IMAGES, or skip the calling test with the reason."""
    if not DEV_IMAGES.is_dir() or not any(DEV_IMAGES.iterdir()):
        pytest.skip(_NO_DATA)
    return DEV_IMAGES


def dev_images(n: int) -> list[Path]:
    """The first n real CXRs (sorted by name), PNG and JPEG interleaved so both formats come.

    Skips the calling test when the data is missing or holds fewer than n images.
    """
    images = require_data()
    pngs = sorted(images.glob("*.png"))
    jpgs = sorted(images.glob("*.jpg"))
    mixed: list[Path] = []
    for i in range(max(len(pngs), len(jpgs))):
        mixed.extend(p[i] for p in (pngs, jpgs) if i < len(p))
    if len(mixed) < n:
        pytest.skip(f"need {n} real CXRs in {images}, found {len(mixed)}")
    return mixed[:n]


@pytest.fixture(scope="session")
def data_images() -> Callable[[int], list[Path]]:
    """Fixture form of `dev_images`."""
    return dev_images


def _untrained_models(tmp_path_factory, size: str):
    from engine.models import init_models

    return init_models(tmp_path_factory.mktemp(f"models-{size}"), size=size, seed=0)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Tiny untrained segmenter + classifier (seed 0), exported once per session."""
    return _untrained_models(tmp_path_factory, "tiny")


@pytest.fixture(scope="session")
def tiny_models_dir(tiny_models) -> Path:
    return tiny_models.classifier.directory


@pytest.fixture(scope="session")
def full_models_dir(tmp_path_factory) -> Path:
    """The real architectures (U-Net + ResNet50, ~100 MB), untrained, seed 0. For `slow` tests."""
    return _untrained_models(tmp_path_factory, "full").classifier.directory


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def plain(text: str) -> str:
    """Terminal output as one line: ANSI codes dropped, runs of whitespace (rich's table and
    line wrapping) collapsed to one space, box-drawing characters removed."""
    text = _ANSI.sub("", text)
    text = re.sub(r"[\u2500-\u257f]", " ", text)
    return " ".join(text.split())


CliResult = tuple[int, str, str]


def run_cli(args: Sequence[str | os.PathLike[str]]) -> CliResult:
    """Run `cxr ARGS` in this process (typer's CliRunner): (exit code, stdout, stderr).

    Exceptions that escape the app fail the test with their traceback: the CLI must turn every
    error into a message and an exit code.
    """
    from typer.testing import CliRunner

    from engine.cli import app

    result = CliRunner().invoke(app, [os.fspath(a) for a in args], catch_exceptions=True)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        tb = "".join(traceback.format_exception(result.exception))
        pytest.fail(f"cxr {' '.join(map(str, args))} raised instead of exiting:\n{tb}")
    return result.exit_code, result.stdout, result.stderr


def cxr_command() -> list[str]:
    """The installed `cxr` entry point, or the same `main` through this interpreter."""
    script = Path(sys.executable).with_name("cxr")
    if script.is_file():
        return [str(script)]
    found = shutil.which("cxr")
    if found:
        return [found]
    return [sys.executable, "-c", "from engine.cli import main; main()"]


def run_cli_subprocess(
    args: Sequence[str | os.PathLike[str]],
    *,
    prefix: Sequence[str] = (),
    timeout: float = 300,
    cwd: Path | None = None,
) -> CliResult:
    """Run the real `cxr` entry point in a child process: (exit code, stdout, stderr).

    `prefix` goes before the command (e.g. a `setpriv ...` wrapper)."""
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
    proc = subprocess.run(
        [*prefix, *cxr_command(), *(os.fspath(a) for a in args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=cwd,
    )
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture(scope="session")
def cli() -> Callable[[Sequence[str | os.PathLike[str]]], CliResult]:
    """Fixture form of `run_cli`."""
    return run_cli


# ---------------------------------------------------------------------------------------------
# small images of every format, made by benchmarks/make_archive.py


ARCHIVE_FORMATS = ("jpeg", "png16", "dicom")


def benchmarks_importable() -> None:
    """benchmarks/ is a folder of the checkout, not of the installed package: put the checkout
    on sys.path, so that `import benchmarks.make_archive` works however pytest was started."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))


def small_archive(out: Path, count: int):
    """The ArchiveSpec of `count` small images of ARCHIVE_FORMATS (JPEG, 16-bit PNG, DICOM) made
    from the real dev images, seed 3."""
    benchmarks_importable()
    from benchmarks.make_archive import ArchiveSpec

    source = str(dev_images(1)[0].parent)
    return ArchiveSpec(
        out=str(out),
        count=count,
        formats=ARCHIVE_FORMATS,
        long_side=(96, 160),
        seed=3,
        source=source,
    )


@pytest.fixture(scope="session")
def bench_archive(tmp_path_factory) -> Path:
    """9 small images in tree/, 3 per format (DICOM: MONOCHROME2, 1, 2), and tree.tar of them."""
    benchmarks_importable()
    from benchmarks.make_archive import make_archive

    out = tmp_path_factory.mktemp("archive")
    make_archive(small_archive(out / "tree", 9), workers=1, tar=out / "tree.tar")
    return out


def archive_files(archive: Path) -> list[Path]:
    """The images of a bench_archive, sorted."""
    return sorted(p for p in (archive / "tree").rglob("*") if p.suffix in (".jpg", ".png", ".dcm"))


# ---------------------------------------------------------------------------------------------
# a screened run to test against, and children that must not hang


def copy_images(folder: Path, images: Sequence[Path]) -> Path:
    """Copy `images` into `folder` (made if missing) under their own names; returns `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    for image in images:
        shutil.copy(image, folder / image.name)
    return folder


def screen_folder(
    inputs: Sequence[Path], out: Path, models: Path, **options: object
) -> list[dict[str, object]]:
    """`cxr screen INPUTS --out OUT` in this process (2 threads, no progress bar, `options` as
    ScreenConfig fields); the rows of OUT/predictions."""
    import polars as pl

    from engine.config import ScreenConfig
    from engine.runner import screen

    config = dict(inputs=tuple(inputs), out=out, models=models, threads=2, progress=False)
    screen(ScreenConfig(**config | options))
    return pl.read_parquet(out / "predictions").to_dicts()


def screen_at_median(inputs: Path, root: Path, models: Path, **options: object) -> Path:
    """Screen `inputs` into root/out with the threshold at the median probability of a first
    run (root/probe), so that both decisions occur even with untrained models."""
    rows = screen_folder([inputs], root / "probe", models, **options)
    probs = [r["prob"] for r in rows if r["prob"] is not None]
    screen_folder([inputs], root / "out", models, threshold=statistics.median(probs), **options)
    return root / "out"


def child_env() -> dict[str, str]:
    """This process's environment with this checkout first on PYTHONPATH: a child Python
    imports this checkout's engine, also where the installed one is another checkout's."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def cxr_argv(*args: object) -> list[str]:
    """The command line of `cxr ARGS` as this checkout's engine (`python -m engine.cli`: an
    installed `cxr` script may import another one), each argument as str."""
    return [sys.executable, "-m", "engine.cli", *map(str, args)]


def run_child(
    args: Sequence[str | os.PathLike[str]], *, timeout: float, what: str
) -> subprocess.CompletedProcess[str]:
    """`python ARGS` of this checkout in a child process (plain terminal output); fails the
    test, saying `what` hung, when it does not finish within `timeout` seconds."""
    env = {**child_env(), "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
    try:
        return subprocess.run(
            [sys.executable, *map(os.fspath, args)],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=REPO,
            env=env,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{what} hung (no answer in {timeout} s)")


def replace_with_fifo(path: Path) -> None:
    """Put a FIFO (named pipe) where the file `path` was."""
    path.unlink()
    os.mkfifo(path)


# ---------------------------------------------------------------------------------------------
# DICOM files built with pydicom


def dicom_file(
    pixels: np.ndarray | None,
    *,
    sop_uid: str,
    study_uid: str,
    patient_id: str,
    sop_class: str = SecondaryCaptureImageStorage,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    frames: int | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    encapsulated: bytes | None = None,
    **elements,
) -> bytes:
    """A DICOM Part 10 file (preamble + DICM) holding `pixels` natively, or `encapsulated`
    (Pixel Data left out when both are None); `elements` (keyword=value) are set last."""
    import io

    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID

    ref = pixels if pixels is not None else np.zeros((8, 8), np.uint16)
    frame_shape = ref.shape[1:] if frames else ref.shape
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = transfer_syntax

    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.PatientID = patient_id
    ds.Modality = "DX"
    ds.ViewPosition = "PA"
    ds.Rows, ds.Columns = frame_shape[0], frame_shape[1]
    ds.SamplesPerPixel = 3 if len(frame_shape) == 3 else 1
    if ds.SamplesPerPixel == 3:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = ref.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if ref.dtype.kind == "i" else 0
    if frames:
        ds.NumberOfFrames = frames
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    if encapsulated is not None:
        ds.PixelData = encapsulated
        ds["PixelData"].VR = "OB"
    elif pixels is not None:
        ds.PixelData = pixels.tobytes()
        ds["PixelData"].VR = "OW" if ds.BitsAllocated > 8 else "OB"
    buf = io.BytesIO()
    uid = UID(transfer_syntax)
    if uid.is_private:
        ds.save_as(buf, enforce_file_format=True, implicit_vr=False, little_endian=True)
    else:
        ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# models


def add_int8_variant(directory: Path, role: str, onnx_name: str) -> Path:
    """Record `onnx_name` in directory's `role` manifest as its int8 export (a copy of the
    reference ONNX when the file is not there): enough for what picks or packs exports."""
    from dataclasses import replace

    from engine.models import Variant, load_manifest, save_manifest, sha256_file

    m = load_manifest(directory / f"{role}.json", verify=False)
    path = directory / onnx_name
    if not path.exists():
        shutil.copy(m.onnx_path, path)
    save_manifest(
        replace(m, variants={"int8": Variant(onnx=onnx_name, sha256=sha256_file(path))}),
        directory,
    )
    return path
