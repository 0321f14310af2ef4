"""`cxr screen --decode-workers N`: images read and decoded side by side, the outputs unchanged.

A mixed input (a tar and a directory: 16-bit PNG, DICOM MONOCHROME1/2 with 12 bits stored,
8-bit JPEG, and broken files of each kind) is screened with one decode worker and with several;
every output a run writes deterministically (rows in order, probabilities, embeddings, previews,
error messages) must be the same. Then what a run must still do with the workers in place:
bound the images in flight, raise a worker's error, stop every thread on an exception or
Ctrl-C, and resume exactly once.
"""

from __future__ import annotations

import io
import tarfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from conftest import dicom_file
from PIL import Image

from engine.config import ScreenConfig, max_threads
from engine.errors import ConfigError
from engine.io import thumbs

BATCH = 4
# Columns that differ between two runs of the same inputs by design.
PER_RUN = ["run_id", "screened_at"]
THREAD_PREFIXES = ("cxr-reader", "cxr-pipeline", "cxr-read")


def _gray(i: int, h: int, w: int, top: int) -> np.ndarray:
    rng = np.random.default_rng(i)
    y, x = np.mgrid[0:h, 0:w]
    base = 0.5 + 0.3 * np.sin(x / (7 + i)) * np.cos(y / (9 + i)) + 0.1 * (y / h)
    noisy = base + rng.normal(0, 0.03, (h, w))
    return np.clip(noisy * top, 0, top)


def png16(i: int) -> bytes:
    a = _gray(i, 150 + 7 * i, 130 + 5 * i, 4095).astype(np.uint16)  # 12-bit data in 16
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def jpeg(i: int) -> bytes:
    a = _gray(i, 140 + 3 * i, 160 + 4 * i, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def dicom(i: int) -> bytes:
    a = _gray(i, 144 + 4 * i, 128 + 6 * i, 4095).astype(np.uint16)
    return dicom_file(
        a,
        sop_uid=f"1.2.826.0.1.3680043.8.498.{100 + i}",
        study_uid="1.2.826.0.1.3680043.8.498.7",
        patient_id=f"PAT-{i:03d}",
        photometric="MONOCHROME1" if i % 2 else "MONOCHROME2",
        bits_stored=12,
        RescaleSlope=1,
        RescaleIntercept=-1024,
        WindowCenter=1000,
        WindowWidth=3000,
    )


def mixed_files() -> dict[str, bytes]:
    """Name -> bytes, in an order that interleaves formats and broken files."""
    files: dict[str, bytes] = {}
    for i in range(6):
        files[f"a{i:02d}-png16.png"] = png16(i)
        files[f"b{i:02d}-scan.dcm"] = dicom(i)
        files[f"c{i:02d}-photo.jpg"] = jpeg(i)
    whole = png16(20)
    files["d00-truncated.png"] = whole[: len(whole) * 2 // 3]
    files["d01-noise.png"] = np.random.default_rng(5).bytes(4000)
    whole = dicom(21)
    files["d02-truncated.dcm"] = whole[: len(whole) - 500]
    files["d03-truncated.jpg"] = jpeg(22)[:900]
    files["d04-tiny.png"] = _tiny_png()
    return files


def _tiny_png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint16)).save(buf, format="PNG")
    return buf.getvalue()  # below --min-side


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, ...]:
    """A .tar with most of the mixed files, and a directory with the rest."""
    root = tmp_path_factory.mktemp("mixed")
    files = sorted(mixed_files().items())
    in_tar, in_dir = files[::3] + files[1::3], files[2::3]
    tar_path = root / "mixed.tar"
    with tarfile.open(tar_path, "w") as tar:
        for name, data in in_tar:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    folder = root / "folder"
    folder.mkdir()
    for name, data in in_dir:
        (folder / name).write_bytes(data)
    return (tar_path, folder)


def config(inputs, out: Path, models: Path, **options) -> ScreenConfig:
    """The runs of this module: 2 threads, batches of BATCH, embeddings in the rows."""
    fixed = dict(threads=2, batch_size=BATCH, shard_size=7, embeddings_in_parquet=True)
    return ScreenConfig(
        inputs=tuple(inputs), out=out, models=models, progress=False, **(fixed | options)
    )


def run(inputs, out: Path, models: Path, **options) -> pl.DataFrame:
    from engine.runner import screen

    screen(config(inputs, out, models, **options))
    return pl.read_parquet(out / "predictions")


@dataclass(frozen=True)
class Outputs:
    rows: pl.DataFrame  # in the order written
    thumbs: pl.DataFrame


def outputs(out: Path) -> Outputs:
    rows = pl.concat(
        [pl.read_parquet(p) for p in sorted((out / "predictions").glob("part-*.parquet"))]
    )
    previews = pl.concat(
        [pl.read_parquet(p) for p in sorted((out / thumbs.THUMBS).glob("part-*.parquet"))]
    )
    return Outputs(rows=rows, thumbs=previews)


def threads_left() -> list[str]:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        left = [t.name for t in threading.enumerate() if t.name.startswith(THREAD_PREFIXES)]
        if not left:
            return []
        time.sleep(0.02)
    return left


@pytest.fixture(scope="module")
def one_worker(inputs, tiny_models_dir, tmp_path_factory) -> Outputs:
    out = tmp_path_factory.mktemp("w1") / "out"
    run(inputs, out, tiny_models_dir, decode_workers=1)
    return outputs(out)


@pytest.mark.parametrize(
    ("decoder", "workers"), [("auto", 4), ("auto", 0), ("pillow", 3), ("dali", 3)]
)
def test_outputs_are_the_same_with_several_workers(
    one_worker, inputs, tiny_models_dir, tmp_path, decoder, workers
):
    out = tmp_path / "out"
    run(inputs, out, tiny_models_dir, decode_workers=workers, decoder=decoder)
    got = outputs(out)
    if decoder == "dali":  # DALI's numbers equal Pillow's to float rounding, not bit for bit
        ref_out = tmp_path / "ref"
        run(inputs, ref_out, tiny_models_dir, decode_workers=1, decoder=decoder)
        ref = outputs(ref_out)
    else:  # "auto" is pillow-draft: the same as "pillow" on PNG/DICOM, and on these small JPEGs
        ref = one_worker
    assert got.rows.drop(PER_RUN).equals(ref.rows.drop(PER_RUN)), "rows differ"
    assert got.thumbs.equals(ref.thumbs), "previews differ"


@pytest.mark.parametrize(("decoder", "where"), [("pillow", "cxr-read"), ("dali", "cxr-pipeline")])
def test_the_workers_read_every_image_and_decode_it_with_pillow(
    tmp_path, tiny_models_dir, inputs, monkeypatch, decoder, where
):
    """sha256, header and DICOM in the workers; the Pillow decode there too, one image at a
    time, while DALI decodes whole batches in the pipeline thread."""
    import engine.screening as screening
    from engine.pipeline import Preprocessor
    from engine.pipeline_pil import PilPreprocessor

    prepared, decoded = [], []
    real_prepare = screening.prepare

    def prepare(item, **kwargs):
        prepared.append(threading.current_thread().name)
        return real_prepare(item, **kwargs)

    def spy(cls, method):
        real = getattr(cls, method)

        def wrapper(self, *args, **kwargs):
            decoded.append(threading.current_thread().name)
            return real(self, *args, **kwargs)

        monkeypatch.setattr(cls, method, wrapper)

    monkeypatch.setattr(screening, "prepare", prepare)
    spy(PilPreprocessor, "run_one")
    spy(PilPreprocessor, "run")
    spy(Preprocessor, "run")
    rows = run(inputs, tmp_path / "out", tiny_models_dir, decode_workers=3, decoder=decoder)
    assert len(prepared) == rows.height
    assert {name.rsplit("_", 1)[0] for name in prepared} == {"cxr-read"}
    assert decoded and {name.rsplit("_", 1)[0] for name in decoded} == {where}


def test_rows_keep_input_order_and_report_every_error(one_worker, inputs):
    rows = one_worker.rows
    with tarfile.open(inputs[0]) as tar:
        tar_members = tar.getnames()  # stored order
    folder_files = sorted(p.name for p in inputs[1].iterdir())
    assert rows["member"].to_list() == [*tar_members, *([None] * len(folder_files))]
    assert [Path(s).name for s in rows["source"].to_list()[len(tar_members) :]] == folder_files
    names = [m or Path(s).name for s, m in zip(rows["source"], rows["member"], strict=True)]
    status = dict(zip(names, rows["status"], strict=True))
    errors = dict(zip(names, rows["error"], strict=True))
    broken = {n for n in names if n.startswith("d0")}
    assert {n for n, s in status.items() if s == "error"} == broken
    assert all(status[n] == "ok" for n in names if n not in broken)
    # each message names the file (archive:member, or the path) and what is wrong with it
    for name, source, member in zip(names, rows["source"], rows["member"], strict=True):
        if name in broken:
            assert errors[name].startswith(f"{source}:{member}: " if member else f"{source}: ")
    assert "truncated or corrupt (OSError: image file is truncated" in errors["d00-truncated.png"]
    assert "not a PNG, JPEG or DICOM file" in errors["d01-noise.png"]
    assert "pixel data is less than expected" in errors["d02-truncated.dcm"]
    assert "truncated or corrupt (OSError: image file is truncated" in errors["d03-truncated.jpg"]
    assert "smaller than the minimum side" in errors["d04-tiny.png"]
    # DICOM tags of the scans are read by the workers too
    scans = rows.filter(pl.col("format") == "dicom", pl.col("status") == "ok")
    assert sorted(scans["patient_id"].to_list()) == [f"PAT-{i:03d}" for i in range(6)]


def test_run_json_records_the_decode_workers(tmp_path, tiny_models_dir, inputs):
    import json

    for workers, recorded in ((3, 3), (0, 2)):  # 0: as many as --threads (2 here)
        out = tmp_path / f"w{workers}"
        run(inputs[1:], out, tiny_models_dir, decode_workers=workers)
        record = json.loads((out / "run.json").read_text())
        assert record["config"]["decode_workers"] == workers
        assert record["decode_workers"] == recorded


def test_bad_worker_counts_are_refused():
    base = dict(inputs=(Path("x"),), out=Path("o"))
    with pytest.raises(ConfigError, match="--decode-workers must be 0"):
        ScreenConfig(**base, decode_workers=-1)
    with pytest.raises(
        ConfigError, match=rf"--decode-workers must be between 1 and {max_threads()}"
    ):
        ScreenConfig(**base, decode_workers=max_threads() + 1)
    assert ScreenConfig(**base, threads=3).workers == 3
    assert ScreenConfig(**base, threads=3, decode_workers=5).workers == 5


def test_images_in_flight_stay_bounded(tmp_path, tiny_models_dir, monkeypatch):
    """Items taken from the walk but not yet written: at most the workers' 2 x workers, the
    batch being filled, and the seven batches the three stages and their queues may hold."""
    import engine.runner as runner

    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(90):
        (folder / f"{i:03d}.png").write_bytes(png16(i % 7))
    taken, written, most = 0, 0, 0
    real = runner.iter_items

    def counting(*args, **kwargs):
        nonlocal taken, most
        for item in real(*args, **kwargs):
            taken += 1
            most = max(most, taken - written)
            yield item

    def on_rows(n: int) -> None:
        nonlocal written
        time.sleep(0.02)  # a slow writer: the readers must wait for it, not run ahead
        written += n

    monkeypatch.setattr(runner, "iter_items", counting)
    workers, batch = 3, 2
    settings = config(
        [folder],
        tmp_path / "out",
        tiny_models_dir,
        batch_size=batch,
        decode_workers=workers,
        embeddings_in_parquet=False,
    )
    summary = runner.screen(settings, on_progress=on_rows)
    assert summary.processed == written == taken == 90
    assert most <= 2 * workers + 8 * batch, most


@pytest.mark.parametrize("decoder", ["auto", "dali"])
def test_a_worker_error_is_raised_and_no_thread_is_left(
    tmp_path, tiny_models_dir, inputs, monkeypatch, decoder
):
    import engine.screening as screening

    real = screening.prepare

    def prepare(item, **kwargs):
        if (item.ref.member or item.ref.source).endswith("b03-scan.dcm"):
            raise RuntimeError("a bug in the reader")
        return real(item, **kwargs)

    monkeypatch.setattr(screening, "prepare", prepare)
    with pytest.raises(RuntimeError, match="a bug in the reader"):
        run(inputs, tmp_path / "out", tiny_models_dir, decode_workers=3, decoder=decoder)
    assert threads_left() == []


def test_ctrl_c_stops_every_thread_and_the_rerun_completes_exactly_once(
    tmp_path, tiny_models_dir, inputs, one_worker
):
    from engine.runner import screen

    out = tmp_path / "out"
    settings = config(inputs, out, tiny_models_dir, decode_workers=4)
    seen = 0

    def interrupt(n: int) -> None:
        nonlocal seen
        seen += n
        if seen >= 2 * BATCH:
            raise KeyboardInterrupt  # what Ctrl-C raises in the main thread

    first = screen(settings, on_progress=interrupt)
    assert first.interrupted and 2 * BATCH <= first.processed < len(one_worker.rows)
    assert threads_left() == []
    second = screen(settings)
    assert not second.interrupted
    assert first.processed + second.processed == len(one_worker.rows)
    rows = outputs(out).rows
    assert rows["key"].n_unique() == rows.height == len(one_worker.rows)
    # the same rows as one uninterrupted run, each exactly once (parts follow the resume order)
    order = one_worker.rows["key"].to_list()
    resumed = rows.drop(PER_RUN).sort(pl.col("key").replace_strict(order, list(range(len(order)))))
    assert resumed.equals(one_worker.rows.drop(PER_RUN))
