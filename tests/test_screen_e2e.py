"""`cxr screen` end to end on real CXRs: every input kind, every bad input, resume, locking,
bad models, options, exit codes, and self-retrieval with `cxr similar`.

One screened output (built once per module, through the real `cxr` entry point in a child
process) serves most assertions; the other tests run the CLI in-process on small inputs.
Tiny models keep this fast; one `slow` test runs the real architectures.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import tarfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from conftest import dev_images, dicom_file, plain, run_cli, run_cli_subprocess
from PIL import Image

from engine.io.archive import image_key
from engine.io.parquet import read_predictions

N_DIR_IMAGES = 20  # real CXRs copied as files into the input directory
ARCHIVE_IMAGES = 3  # real CXRs in each of the .tar, .tar.gz and .zip

PATIENT_ID, STUDY_UID, SOP_UID = (
    "E2E-PAT-7",
    "1.2.826.0.1.3680043.8.498.77",
    "1.2.826.0.1.3680043.8.498.78",
)
JPEG2000_LOSSLESS = "1.2.840.10008.1.2.4.90"

# The columns the issue names for every row, with their types.
ISSUE_COLUMNS = {
    "key": pl.UInt64,
    "source": pl.String,
    "member": pl.String,
    "sha256": pl.String,
    "format": pl.String,
    "width": None,
    "height": None,
    "bit_depth": None,
    "patient_id": pl.String,
    "study_uid": pl.String,
    "sop_uid": pl.String,
    "view_position": pl.String,
    "modality": pl.String,
    "status": pl.String,
    "error": pl.String,
    "prob": None,
    "decision": pl.Boolean,
    "threshold": None,
    "lung_bbox": None,
    "lung_fraction": None,
    "model_id": pl.String,
}


# ---------------------------------------------------------------------------------------------
# building the input set


@dataclass
class Expected:
    """What one input should become: status "ok", or "error" with words its message holds."""

    status: str
    words: tuple[str, ...] = ()


@dataclass
class InputSet:
    root: Path
    directory: Path
    archives: list[Path]
    expected: dict[tuple[str, str | None], Expected] = field(default_factory=dict)
    unreadable: Path | None = None
    unreadable_skip: str | None = None  # why the unreadable case is left out, if it is
    cli_prefix: list[str] = field(default_factory=list)  # runs the CLI where reads are refused
    # derived file name -> ((height, width), bit_depth, format) it must be recorded with
    derived: dict[str, tuple[tuple[int, int], int, str]] = field(default_factory=dict)

    @property
    def inputs(self) -> list[Path]:
        return [self.directory, *self.archives]

    def ok_files(self) -> list[Path]:
        return [Path(s) for (s, m), e in self.expected.items() if m is None and e.status == "ok"]


def _gray(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("L"))


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """PNG signature + a valid IHDR chunk, nothing else: what a decompression bomb shows first."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (
        b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))
    )


def make_dicom(pixels: np.ndarray | None, *, transfer_syntax: str | None = None) -> bytes:
    """A DX DICOM Part 10 file built from a real image's 8-bit pixels.

    Stored as MONOCHROME1 (white = 0), 16 bits allocated / 12 stored, with a rescale and a window
    covering the data: decoding must invert it back to the real image. `pixels=None` leaves out
    Pixel Data; `transfer_syntax` (with pixels=None) writes encapsulated junk under that syntax.
    """
    from pydicom.encaps import encapsulate
    from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian

    # stored = (255 - p) * 16 in 0..4080 -> rescaled -1024..7136; window over exactly that
    header = dict(
        sop_uid=SOP_UID,
        study_uid=STUDY_UID,
        patient_id=PATIENT_ID,
        sop_class=DigitalXRayImageStorageForPresentation,
        photometric="MONOCHROME1",
        bits_stored=12,
        transfer_syntax=transfer_syntax or ExplicitVRLittleEndian,
        RescaleSlope="2",
        RescaleIntercept="-1024",
        WindowCenter="3056",
        WindowWidth="8161",
    )
    if pixels is not None:
        return dicom_file(((255 - pixels.astype(np.uint16)) * 16).astype("<u2"), **header)
    junk = None
    if transfer_syntax is not None:
        junk = encapsulate([b"\xff\x4f\xff\x51" + bytes(range(256)) * 8])
    return dicom_file(None, encapsulated=junk, Rows=512, Columns=480, **header)


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _tar(path: Path, members: list[tuple[str, bytes]], mode: str) -> Path:
    with tarfile.open(path, mode) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)  # the name exactly as given: "../x.png" stays so
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tf.addfile(info, io.BytesIO(data))
    return path


def _zip(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return path


def _unreadable(path: Path) -> tuple[list[str] | None, str | None]:
    """chmod 000 `path`; return (prefix that runs a command unable to read it, None) or
    (None, reason) when this machine cannot make a file unreadable to us.

    Root reads anything through CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH; dropping both from
    the bounding set (setpriv) and exec'ing gives a child that honours the file mode."""
    path.chmod(0)
    try:
        with open(path, "rb"):
            pass
    except PermissionError:
        return [], None
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None, "running with CAP_DAC_OVERRIDE (root) and no setpriv to drop it"
    prefix = [setpriv, "--bounding-set", "-dac_override,-dac_read_search"]
    probe = subprocess.run([*prefix, "cat", str(path)], capture_output=True, text=True)
    if probe.returncode == 0 or "denied" not in probe.stderr.lower():
        return None, f"cannot drop CAP_DAC_OVERRIDE with setpriv: {probe.stderr.strip()}"
    return prefix, None


def build_inputs(root: Path) -> InputSet:
    images = dev_images(N_DIR_IMAGES + 8 + 3 * ARCHIVE_IMAGES)
    plain_images, derived_src, archive_src = (
        images[:N_DIR_IMAGES],
        images[N_DIR_IMAGES : N_DIR_IMAGES + 8],
        images[N_DIR_IMAGES + 8 :],
    )
    directory = root / "in"
    s = InputSet(root=root, directory=directory, archives=[])
    exp = s.expected

    def file(path: Path, expected: Expected) -> None:
        exp[(str(path), None)] = expected

    for src in plain_images:
        file(_write(directory / "real" / src.name, src.read_bytes()), Expected("ok"))

    # real images re-encoded as the other kinds of file archives hold (each from its own image,
    # so that no two inputs have the same pixels and self-retrieval has one right answer)
    png_src = next(p for p in derived_src if p.suffix == ".png")
    jpg_src = next(p for p in derived_src if p.suffix == ".jpg")
    g = [_gray(p) for p in derived_src]
    derived = directory / "derived"
    arr16 = (g[2].astype(np.uint16) * 16 + 5).astype(np.uint16)  # 12-bit data in a 16-bit PNG
    im16 = Image.fromarray(arr16)
    assert im16.mode == "I;16"
    rgb = Image.fromarray(np.stack([g[3], g[3] // 2 + 60, g[3]], -1), "RGB")
    rgba = Image.fromarray(np.dstack([g[4], g[4], g[4], np.full_like(g[4], 200)]), "RGBA")
    palette = Image.fromarray(g[5]).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    file(_write(derived / "sixteen-bit.png", _png(im16)), Expected("ok"))
    file(_write(derived / "rgb.png", _png(rgb)), Expected("ok"))
    file(_write(derived / "rgba.png", _png(rgba)), Expected("ok"))
    file(_write(derived / "palette.png", _png(palette)), Expected("ok"))
    file(_write(derived / "mono1.dcm", make_dicom(g[6])), Expected("ok"))
    s.derived = {
        "sixteen-bit.png": (g[2].shape, 16, "png"),
        "rgb.png": (g[3].shape, 8, "png"),
        "rgba.png": (g[4].shape, 8, "png"),
        "palette.png": (g[5].shape, 8, "png"),
        "mono1.dcm": (g[6].shape, 12, "dicom"),
    }

    bad = directory / "bad"
    png_bytes, jpg_bytes = png_src.read_bytes(), jpg_src.read_bytes()
    cases = {
        "truncated.png": (png_bytes[: len(png_bytes) // 2], ("truncated",)),
        "truncated.jpg": (jpg_bytes[: len(jpg_bytes) // 2], ("truncated",)),
        "empty.png": (b"", ("0 bytes",)),
        "notes.png": (b"radiology report, not an image\n" * 20, ("not a PNG, JPEG or DICOM",)),
        "one-pixel.png": (_png(Image.fromarray(g[7][:1, :1])), ("1x1", "minimum side")),
        "bomb.png": (png_header_only(40000, 40000), ("40000x40000", "pixels", "--max-pixels")),
        "no-pixels.dcm": (make_dicom(None), ("no pixel data",)),
        "j2k-junk.dcm": (
            make_dicom(None, transfer_syntax=JPEG2000_LOSSLESS),
            (JPEG2000_LOSSLESS, "JPEG 2000"),
        ),
        "unreadable.png": (png_bytes, ("permission denied",)),
    }
    for name, (data, words) in cases.items():
        file(_write(bad / name, data), Expected("error", words))
    link = bad / "link.png"
    link.symlink_to(directory / "real" / plain_images[0].name)
    file(link, Expected("error", ("symlink",)))

    s.unreadable = bad / "unreadable.png"
    prefix, why = _unreadable(s.unreadable)
    if prefix is None:
        s.unreadable.chmod(0o644)
        s.unreadable.unlink()
        del exp[(str(s.unreadable), None)]
        s.unreadable_skip = why
    else:
        s.cli_prefix = prefix

    srcs = iter(archive_src)
    for name, mode in (("set.tar", "w"), ("set.tar.gz", "w:gz"), ("set.zip", None)):
        members = [(f"cases/{p.name}", p.read_bytes()) for p in (next(srcs) for _ in range(3))]
        path = root / name
        for member, _ in members:
            exp[(str(path), member)] = Expected("ok")
        if name == "set.tar":
            evil = [("../x.png", png_bytes), ("/tmp/evil.png", jpg_bytes)]
            members[1:1] = evil
            exp[(str(path), "../x.png")] = Expected("error", ("unsafe", "../x.png", ".."))
            exp[(str(path), "/tmp/evil.png")] = Expected("error", ("unsafe", "absolute"))
        s.archives.append(_zip(path, members) if mode is None else _tar(path, members, mode))
    return s


# ---------------------------------------------------------------------------------------------
# the screened output shared by most tests


def _tree(root: Path) -> set[str]:
    """Every path under root (relative), symlinks listed but not followed."""
    found = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            found.add(os.path.relpath(os.path.join(dirpath, name), root))
    return found


# where a tar member named "../x.png" or "/tmp/evil.png" would land if anything extracted it
_OUTSIDE = (Path("/tmp/evil.png"), Path("/tmp/x.png"), Path("/x.png"))


@dataclass
class Screened:
    inputs: InputSet
    out: Path
    code: int
    stdout: str
    stderr: str
    created: set[str]  # paths that appeared under inputs.root.parent during the run
    outside_before: dict[Path, bool]
    models_dir: Path

    @property
    def df(self) -> pl.DataFrame:
        return read_predictions(self.out)

    def rows(self) -> dict[tuple[str, str | None], dict]:
        return {(r["source"], r["member"]): r for r in self.df.iter_rows(named=True)}


@pytest.fixture(scope="module")
def input_set(tmp_path_factory):
    s = build_inputs(tmp_path_factory.mktemp("e2e"))
    yield s
    if s.unreadable is not None and s.unreadable.exists():
        s.unreadable.chmod(0o644)  # let pytest clean up


def screen_args(s: InputSet, out: Path, models: Path, *extra: str) -> list[str | Path]:
    return ["screen", *s.inputs, "--out", out, "--models", models, *extra]


@pytest.fixture(scope="module")
def screened(input_set, tiny_models_dir) -> Screened:
    """`cxr screen` through the installed entry point, small batches and shards so that several
    batches and Parquet parts are written."""
    out = input_set.root / "out"
    watched = input_set.root.parent
    before, outside = _tree(watched), {p: p.exists() for p in _OUTSIDE}
    code, stdout, stderr = run_cli_subprocess(
        screen_args(input_set, out, tiny_models_dir, "--batch-size", "8", "--shard-size", "16"),
        prefix=input_set.cli_prefix,
        cwd=input_set.directory / "real",  # "../x.png" from here would land in the input tree
    )
    created = _tree(watched) - before
    return Screened(input_set, out, code, stdout, stderr, created, outside, tiny_models_dir)


def _where(source: str, member: str | None) -> str:
    return f"{source}:{member}" if member else source


# ---------------------------------------------------------------------------------------------
# one run over every kind of input


def test_exit_code_3_and_exactly_one_row_per_input(screened):
    s = screened
    assert s.code == 3, f"stdout:\n{s.stdout}\nstderr:\n{s.stderr}"
    df = s.df
    expected = s.inputs.expected
    assert df.height == len(expected)
    assert set(s.rows()) == set(expected)
    assert df["key"].n_unique() == df.height
    for r in df.iter_rows(named=True):
        assert r["key"] == image_key(r["source"], r["member"])
    n_ok = sum(e.status == "ok" for e in expected.values())
    assert n_ok == N_DIR_IMAGES + 5 + 3 * ARCHIVE_IMAGES
    assert (df["status"] == "ok").sum() == n_ok
    assert (df["status"] == "error").sum() == len(expected) - n_ok


def test_each_input_gets_its_status_and_a_message_naming_the_problem_and_file(screened):
    rows = screened.rows()
    for (source, member), exp in screened.inputs.expected.items():
        r = rows[(source, member)]
        where = _where(source, member)
        assert r["status"] == exp.status, f"{where}: {r['error']}"
        if exp.status == "ok":
            assert r["error"] is None
            assert 0.0 <= r["prob"] <= 1.0
            assert r["decision"] == (r["prob"] >= r["threshold"])
            assert r["threshold"] == pytest.approx(0.5)
            assert 0.0 < r["lung_fraction"] <= 1.0
            continue
        assert r["error"].startswith(f"{where}: "), r["error"]
        assert r["prob"] is None and r["decision"] is None and r["lung_bbox"] is None
        for word in exp.words:
            assert word.lower() in r["error"].lower(), f"{word!r} not in {r['error']!r}"


def test_bad_inputs_cover_the_issue_list(screened):
    """Guards the input set itself: every bad input the issue lists is in the run."""
    names = {Path(s).name if m is None else m for (s, m), e in screened.inputs.expected.items()}
    wanted = {
        "truncated.png", "truncated.jpg", "empty.png", "notes.png", "one-pixel.png", "bomb.png",
        "no-pixels.dcm", "j2k-junk.dcm", "link.png", "../x.png", "/tmp/evil.png",
    }  # fmt: skip
    assert wanted <= names
    if screened.inputs.unreadable_skip is None:
        assert "unreadable.png" in names
    kinds = {(Path(s).suffix, m is None) for (s, m) in screened.inputs.expected}
    assert {(".tar", False), (".gz", False), (".zip", False)} <= kinds


def test_unreadable_file_is_an_error_row(screened):
    s = screened.inputs
    if s.unreadable_skip:
        pytest.skip(f"cannot make a file unreadable here: {s.unreadable_skip}")
    r = screened.rows()[(str(s.unreadable), None)]
    assert r["status"] == "error"
    assert r["error"] == f"{s.unreadable}: cannot read: permission denied"
    assert r["sha256"] is None


def test_parquet_schema_has_every_column_the_issue_names(screened):
    parts = sorted((screened.out / "predictions").glob("part-*.parquet"))
    assert len(parts) == -(-len(screened.inputs.expected) // 16)  # --shard-size 16
    for part in parts:
        schema = pl.read_parquet_schema(part)
        for name, dtype in ISSUE_COLUMNS.items():
            assert name in schema, f"{part.name} lacks {name}"
            if dtype is not None:
                assert schema[name] == dtype, f"{name}: {schema[name]}"
        for name in ("width", "height", "bit_depth"):
            assert schema[name].is_integer()
        for name in ("prob", "threshold", "lung_fraction"):
            assert schema[name].is_float()
        bbox = schema["lung_bbox"]
        assert isinstance(bbox, pl.Array) and bbox.size == 4 and bbox.inner.is_integer()
        assert "embedding" not in schema  # only with --embeddings-in-parquet


def test_sha256_is_the_hash_of_the_bytes_read(screened):
    s = screened.inputs
    members: dict[tuple[str, str], bytes] = {}
    for archive in s.archives:
        if archive.suffix == ".zip":
            with zipfile.ZipFile(archive) as zf:
                members.update({(str(archive), n): zf.read(n) for n in zf.namelist()})
        else:
            with tarfile.open(archive) as tf:
                for info in tf.getmembers():
                    members[(str(archive), info.name)] = tf.extractfile(info).read()
    checked = skipped = 0
    for (source, member), r in screened.rows().items():
        never_read = member in ("../x.png", "/tmp/evil.png") or Path(source).name in (
            "link.png",
            "unreadable.png",
        )
        if never_read:
            assert r["sha256"] is None, _where(source, member)
            skipped += 1
            continue
        data = members[(source, member)] if member else Path(source).read_bytes()
        assert r["sha256"] == hashlib.sha256(data).hexdigest(), _where(source, member)
        checked += 1
    assert skipped == 3 + (s.unreadable_skip is None)
    assert checked == len(screened.inputs.expected) - skipped


def test_size_bit_depth_and_format_of_derived_inputs(screened):
    rows = screened.rows()
    for name, ((h, w), depth, fmt) in screened.inputs.derived.items():
        r = rows[(str(screened.inputs.directory / "derived" / name), None)]
        assert (r["width"], r["height"], r["bit_depth"], r["format"]) == (w, h, depth, fmt), name
    for (source, _member), r in rows.items():
        if Path(source).parent.name == "real":
            with Image.open(source) as im:
                assert (r["width"], r["height"]) == im.size
            assert r["format"] == {".png": "png", ".jpg": "jpeg"}[Path(source).suffix]
            assert r["bit_depth"] == 8


def test_dicom_identifiers_are_copied(screened):
    rows = screened.rows()
    for name in ("derived/mono1.dcm", "bad/no-pixels.dcm"):
        r = rows[(str(screened.inputs.directory / name), None)]
        got = [r[c] for c in ("patient_id", "study_uid", "sop_uid", "view_position", "modality")]
        assert got == [PATIENT_ID, STUDY_UID, SOP_UID, "PA", "DX"], name
    for r in rows.values():
        if r["format"] != "dicom":
            assert r["patient_id"] is None and r["study_uid"] is None


def test_lung_bbox_lies_inside_the_image(screened):
    ok = screened.df.filter(pl.col("status") == "ok")
    assert ok.height > 0
    for r in ok.iter_rows(named=True):
        x0, y0, x1, y1 = r["lung_bbox"]
        assert 0 <= x0 < x1 <= r["width"], r["source"]
        assert 0 <= y0 < y1 <= r["height"], r["source"]


def test_index_holds_exactly_the_ok_rows(screened):
    from engine.io.vectors import load_index

    index = load_index(screened.out)
    ok_keys = set(screened.df.filter(pl.col("status") == "ok")["key"].to_list())
    assert len(index) == len(ok_keys)
    assert {int(k) for k in np.asarray(index.keys)} == ok_keys
    assert index.ndim == 64  # the tiny classifier's embedding
    assert not list((screened.out / "embeddings").glob("*.npz"))  # sidecars merged and removed


def test_nothing_is_written_outside_the_output_directory(screened):
    out_rel = os.path.relpath(screened.out, screened.inputs.root.parent)
    stray = {p for p in screened.created if p != out_rel and not p.startswith(out_rel + os.sep)}
    assert stray == set()
    assert not any(Path(p).name in ("x.png", "evil.png") for p in screened.created)
    for path, existed in screened.outside_before.items():
        assert path.exists() == existed, path
    assert {p.name for p in screened.out.iterdir()} <= {
        ".lock", "run.json", "predictions", "embeddings", "index.usearch", "thumbs",
    }  # fmt: skip
    assert not list(screened.out.rglob("*.tmp*"))


def test_run_json_records_config_models_libraries_counts_and_timings(screened):
    from engine.models import sha256_file

    run = json.loads((screened.out / "run.json").read_text())
    assert run["status"] == "complete"
    config = run["config"]
    assert config["inputs"] == [str(p) for p in screened.inputs.inputs]
    assert (config["out"], config["models"]) == (str(screened.out), str(screened.models_dir))
    assert (config["batch_size"], config["shard_size"], config["threshold"]) == (8, 16, None)
    from engine.config import CPU_DECODER

    # --decoder auto (the default) is resolved and recorded: the CPU decoder on the CPU path
    assert (config["decoder"], run["decoder"]) == ("auto", CPU_DECODER)
    for role in ("segmenter", "classifier"):
        m = run["models"][role]
        assert m["sha256"] == sha256_file(Path(m["onnx"]))
        assert m["trained"] is False
    for lib in ("python", "numpy", "polars", "usearch", "onnxruntime", "pydicom", "cxr-engine"):
        assert run["libraries"][lib], lib
    n, n_ok = len(screened.inputs.expected), len(screened.inputs.ok_files()) + 3 * ARCHIVE_IMAGES
    counts = run["counts"]
    assert counts["processed"] == counts["total_rows"] == n
    assert counts["ok"] == counts["index_size"] == n_ok
    assert counts["error"] == counts["total_errors"] == n - n_ok
    assert counts["skipped_existing"] == 0
    timings = run["timings"]
    assert timings["wall_s"] > 0 and timings["images_per_s"] > 0
    assert {"read", "decode+preprocess", "segment", "classify", "write"} <= set(
        timings["stage_busy_s"]
    )
    assert set(timings["batch_latency_ms"]) == {"p50", "p99"}


def test_summary_reports_counts_errors_and_the_untrained_warning(screened):
    text = plain(screened.stdout)
    n = len(screened.inputs.expected)
    n_err = sum(e.status == "error" for e in screened.inputs.expected.values())
    assert f"screened now {n} " in text
    assert f"errors {n_err} " in text
    assert f"rows in output / errors {n} / {n_err}" in text
    assert "UNTRAINED" in text
    assert "WARNING: the models are UNTRAINED" in text and "meaningless" in text
    errors = set(screened.df["error"].drop_nulls().to_list())
    shown = [ln.strip()[len("error ") :] for ln in screened.stdout.splitlines()]
    shown = [ln for ln in shown if ln.startswith("/")]  # "  error /path...: message" lines
    assert len(shown) == min(n_err, 10)
    assert set(shown) <= errors  # each whole, on one line, naming its file
    if n_err > 10:
        assert f"... {n_err - 10} more" in text


# ---------------------------------------------------------------------------------------------
# similar


def test_every_screened_file_finds_itself_first(screened):
    from engine.similar import similar

    rows = screened.rows()
    files = screened.inputs.ok_files()
    assert len(files) == N_DIR_IMAGES + 5
    for path in files:
        result = similar(screened.out, str(path), k=1)
        key = rows[(str(path), None)]["key"]
        assert result.query_key == key
        assert [n.key for n in result.neighbours] == [key], path
        assert result.neighbours[0].similarity == pytest.approx(1.0, abs=2e-3)
        assert result.neighbours[0].source == str(path)


def test_large_indexes_search_approximately_with_the_wider_breadth(screened, monkeypatch):
    """Above EXACT_SEARCH_UP_TO the HNSW search runs with EXPANSION_SEARCH (not usearch's 64)."""
    import engine.similar as sim
    from engine.io import vectors

    seen: list[tuple[int, bool]] = []
    original = vectors.load_index

    def spying_load(*args, **kwargs):
        index = original(*args, **kwargs)
        search = index.search

        def spy(vector, count, exact=False):
            seen.append((index.expansion_search, exact))
            return search(vector, count, exact=exact)

        index.search = spy
        return index

    monkeypatch.setattr(vectors, "load_index", spying_load)
    key = str(screened.df.filter(pl.col("status") == "ok")["key"][0])
    exact = sim.similar(screened.out, key, k=3)
    monkeypatch.setattr(sim, "EXACT_SEARCH_UP_TO", 0)
    approx = sim.similar(screened.out, key, k=3)
    assert seen[0][1] is True and seen[1] == (sim.EXPANSION_SEARCH, False)
    # a small index is searched exhaustively by HNSW at this breadth: the same answer
    assert [n.key for n in approx.neighbours] == [n.key for n in exact.neighbours]


def test_archive_members_are_queried_by_key_and_exclude_themselves(screened):
    from engine.similar import similar

    ok_keys = set(screened.df.filter(pl.col("status") == "ok")["key"].to_list())
    members = [r for (s, m), r in screened.rows().items() if m is not None and r["status"] == "ok"]
    assert len(members) == 3 * ARCHIVE_IMAGES
    for r in members:
        result = similar(screened.out, str(r["key"]), k=3)
        keys = [n.key for n in result.neighbours]
        assert len(keys) == 3 and len(set(keys)) == 3
        assert r["key"] not in keys and set(keys) <= ok_keys
        sims = [n.similarity for n in result.neighbours]
        assert sims == sorted(sims, reverse=True)
        assert [n.rank for n in result.neighbours] == [1, 2, 3]


def test_similar_cli_prints_json_with_k_neighbours(screened):
    r = next(r for r in screened.rows().values() if r["member"] and r["status"] == "ok")
    code, stdout, stderr = run_cli(
        ["similar", str(r["key"]), "--out", screened.out, "-k", "4", "--json"]
    )
    assert code == 0, stderr
    doc = json.loads(stdout)
    assert doc["query_key"] == r["key"]
    assert len(doc["neighbours"]) == 4
    rows = screened.rows()
    for n in doc["neighbours"]:
        assert set(n) >= {"rank", "key", "similarity", "source", "member", "prob", "decision"}
        assert rows[(n["source"], n["member"])]["key"] == n["key"]

    path = screened.inputs.ok_files()[0]
    code, stdout, _ = run_cli(["similar", path, "--out", screened.out, "-k", "2", "--json"])
    assert code == 0
    assert [n["source"] for n in json.loads(stdout)["neighbours"]][0] == str(path)

    code, _, stderr = run_cli(["similar", "no-such-thing", "--out", screened.out])
    assert code == 1 and "neither an existing image file nor a key" in plain(stderr)
    code, _, stderr = run_cli(["similar", "9" * 30, "--out", screened.out])  # above uint64
    assert code == 1 and "is not in" in plain(stderr)


# ---------------------------------------------------------------------------------------------
# resume


def test_rerun_of_the_same_command_screens_nothing_new(screened, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(screened.out, out)
    from engine.io.vectors import load_index

    before = read_predictions(out)
    code, stdout, _ = run_cli(screen_args(screened.inputs, out, screened.models_dir))
    assert code == 3  # the error rows of the first run are still errors
    text = plain(stdout)
    assert "screened now 0 " in text
    assert f"already in output (skipped) {before.height} " in text
    after = read_predictions(out)
    assert after.height == before.height and after["key"].n_unique() == after.height
    assert sorted(after["key"].to_list()) == sorted(before["key"].to_list())
    assert len(load_index(out)) == (before["status"] == "ok").sum()
    run = json.loads((out / "run.json").read_text())
    assert run["counts"]["processed"] == 0 and len(run["history"]) == 1


def _good_dir(root: Path, images: list[Path]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for src in images:
        shutil.copyfile(src, root / src.name)
    return root


def test_only_good_images_exit_0_and_resume_adds_only_new_files(tmp_path, tiny_models_dir):
    from engine.io.vectors import load_index

    images = dev_images(N_DIR_IMAGES + 40)[-8:]  # not used by the module's input set
    inp, out = _good_dir(tmp_path / "in", images[:6]), tmp_path / "out"
    args = ["screen", inp, "--out", out, "--models", tiny_models_dir, "--batch-size", "4"]

    code, stdout, stderr = run_cli(args)
    assert code == 0, stdout + stderr
    first = read_predictions(out)
    assert first.height == 6 and (first["status"] == "ok").all()

    code, stdout, _ = run_cli(args)
    assert code == 0 and "screened now 0 " in plain(stdout)
    assert read_predictions(out).height == 6 and len(load_index(out)) == 6

    for src in images[6:]:
        shutil.copyfile(src, inp / f"new-{src.name}")
    code, stdout, _ = run_cli(args)
    assert code == 0 and "screened now 2 " in plain(stdout)
    assert "already in output (skipped) 6 " in plain(stdout)
    final = read_predictions(out)
    assert final.height == 8 and final["key"].n_unique() == 8
    added = set(final["source"].to_list()) - set(first["source"].to_list())
    assert added == {str(inp / f"new-{p.name}") for p in images[6:]}
    index = load_index(out)
    assert {int(k) for k in np.asarray(index.keys)} == set(final["key"].to_list())


def test_interrupted_run_exits_130_keeps_its_rows_and_resumes(
    tmp_path, tiny_models_dir, monkeypatch
):
    import engine.screening as screening

    images = dev_images(N_DIR_IMAGES + 40)[-12:]
    inp, out = _good_dir(tmp_path / "in", images), tmp_path / "out"
    args = ["screen", inp, "--out", out, "--models", tiny_models_dir]
    args += ["--batch-size", "4", "--shard-size", "4"]
    real_finish, calls = screening.finish_batch, []

    def finish_then_interrupt(batch, screener):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C while the second batch is being inferred
        return real_finish(batch, screener)

    monkeypatch.setattr(screening, "finish_batch", finish_then_interrupt)
    code, stdout, _ = run_cli(args)
    assert code == 130
    assert "interrupted" in plain(stdout)
    kept = read_predictions(out)
    assert kept.height == 4 and (kept["status"] == "ok").all()
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"

    monkeypatch.setattr(screening, "finish_batch", real_finish)
    code, stdout, _ = run_cli(args)
    assert code == 0 and "screened now 8 " in plain(stdout)
    final = read_predictions(out)
    assert final.height == 12 and final["key"].n_unique() == 12

    from engine.io.vectors import load_index

    assert len(load_index(out)) == 12


# ---------------------------------------------------------------------------------------------
# refusals before any image is read


def test_a_second_run_on_the_same_output_is_refused(tmp_path, tiny_models_dir):
    from engine.io.outdir import OutputLock

    inp, out = _good_dir(tmp_path / "in", []), tmp_path / "out"  # refused before any read
    with OutputLock(out):
        code, stdout, stderr = run_cli(["screen", inp, "--out", out, "--models", tiny_models_dir])
    assert code == 1
    message = plain(stderr)
    assert "another cxr screen" in message and str(out) in message
    assert f"pid {os.getpid()}" in message
    assert not (out / "predictions").exists() and not (out / "run.json").exists()


@pytest.fixture
def no_reading(monkeypatch):
    """Fail the test if the runner starts walking the inputs."""
    import engine.runner as runner

    def forbidden(*args, **kwargs):
        raise AssertionError("an input was read before the models were checked")

    monkeypatch.setattr(runner, "iter_items", forbidden)


def test_missing_models_directory_is_fatal_and_named(tmp_path, no_reading):
    inp, out = _good_dir(tmp_path / "in", []), tmp_path / "out"
    missing = tmp_path / "no-models"
    code, stdout, stderr = run_cli(["screen", inp, "--out", out, "--models", missing])
    assert code == 1
    assert str(missing) in plain(stderr) and "not found" in plain(stderr)
    assert not out.exists()


def test_corrupted_onnx_is_fatal_and_named(tmp_path, tiny_models_dir, no_reading):
    models = tmp_path / "models"
    shutil.copytree(tiny_models_dir, models)
    onnx = models / "classifier.onnx"
    data = bytearray(onnx.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 16):
        data[i] ^= 0xFF
    onnx.write_bytes(bytes(data))
    inp, out = _good_dir(tmp_path / "in", []), tmp_path / "out"
    code, stdout, stderr = run_cli(["screen", inp, "--out", out, "--models", models])
    assert code == 1
    message = plain(stderr)
    assert str(onnx) in message and "sha256" in message and "corrupt" in message
    assert not out.exists()


def test_without_models_the_message_says_how_to_get_them(tmp_path, monkeypatch, no_reading):
    from engine.models import modelset

    monkeypatch.setattr(modelset, "PACKAGED_MODELS", tmp_path / "packaged")
    inp, out = _good_dir(tmp_path / "in", []), tmp_path / "out"
    code, stdout, stderr = run_cli(["screen", inp, "--out", out])
    assert code == 1
    assert "cxr models init" in plain(stderr) and "--models" in plain(stderr)
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# options


def test_threshold_changes_decisions_and_is_recorded(tmp_path, tiny_models_dir):
    inp = _good_dir(tmp_path / "in", dev_images(N_DIR_IMAGES + 40)[-10:])
    base = ["screen", inp, "--models", tiny_models_dir]
    assert run_cli([*base, "--out", tmp_path / "default"])[0] == 0
    default = read_predictions(tmp_path / "default").sort("key")
    probs = np.sort(default["prob"].to_numpy())
    threshold = round(float(probs[4] + probs[5]) / 2, 6)  # half the images on each side
    assert run_cli([*base, "--out", tmp_path / "custom", "--threshold", str(threshold)])[0] == 0
    custom = read_predictions(tmp_path / "custom").sort("key")

    assert (default["threshold"] == 0.5).all()  # the manifest's
    assert np.allclose(custom["threshold"].to_numpy(), threshold)
    assert custom["decision"].to_list() == (custom["prob"] >= threshold).to_list()
    assert custom["decision"].sum() == 5
    assert custom["decision"].to_list() != default["decision"].to_list()
    np.testing.assert_allclose(custom["prob"].to_numpy(), default["prob"].to_numpy(), atol=1e-6)
    run = json.loads((tmp_path / "custom" / "run.json").read_text())
    assert run["config"]["threshold"] == threshold and run["models"]["threshold"] == threshold


def test_embeddings_in_parquet_adds_an_embedding_column(tmp_path, tiny_models_dir):
    from engine.io.vectors import load_index

    inp = _good_dir(tmp_path / "in", dev_images(4))
    (inp / "empty.png").write_bytes(b"")
    out = tmp_path / "out"
    code, _, _ = run_cli(
        ["screen", inp, "--out", out, "--models", tiny_models_dir, "--embeddings-in-parquet"]
    )
    assert code == 3  # the empty file
    df = read_predictions(out)
    assert df.schema["embedding"] == pl.Array(pl.Float32, 64)
    index = load_index(out)
    for r in df.iter_rows(named=True):
        emb = np.asarray(r["embedding"], np.float32)
        assert emb.shape == (64,)
        if r["status"] != "ok":
            assert np.isnan(emb).all()
            continue
        stored = np.asarray(index.get(np.uint64(r["key"])), np.float32)
        cos = emb @ stored / (np.linalg.norm(emb) * np.linalg.norm(stored))
        assert cos > 0.999


@pytest.mark.parametrize(
    ("extra", "code", "words"),
    [
        (["--batch-size", "0"], 1, ["--batch-size", "0"]),
        (["--threshold", "2"], 1, ["--threshold", "2"]),
        (["--shard-size", "0"], 1, ["--shard-size"]),
        (["--backend", "cuda-magic"], 1, ["--backend", "cuda-magic"]),
        (["--precision", "fp8"], 1, ["--precision", "fp8"]),
        (["--batch-size", "many"], 2, ["--batch-size", "integer"]),
        (["--no-such-option"], 2, ["--no-such-option"]),
    ],
)
def test_bad_option_values_are_refused_with_a_message(
    tmp_path, tiny_models_dir, extra, code, words
):
    inp, out = _good_dir(tmp_path / "in", []), tmp_path / "out"  # refused before any read
    got, stdout, stderr = run_cli(
        ["screen", inp, "--out", out, "--models", tiny_models_dir, *extra]
    )
    assert got == code
    message = plain(stdout + stderr)
    for word in words:
        assert word in message
    assert not out.exists()


def test_documented_exit_codes_are_the_ones_used():
    """The codes in engine/cli.py's docstring are exactly its EXIT_* constants, which the
    tests above observe: 0 and 3 (the shared run, resume), 1 (models, lock, option values),
    2 (usage), 130 (interrupt); 4 (nothing found) is observed in tests/adversarial, 5
    (--fail-on-drift) in tests/nightly/test_nightly.py."""
    import re

    import engine.cli as cli

    documented = {int(c) for c in re.findall(r"^\s+(\d+)\s+\S", cli.__doc__, re.M)}
    constants = {v for k, v in vars(cli).items() if k.startswith("EXIT_")}
    assert documented == constants == {0, 1, 2, 3, 4, 5, 130}


def test_missing_out_is_a_usage_error(tmp_path):
    code, stdout, stderr = run_cli(["screen", tmp_path])
    assert code == 2 and "--out" in plain(stdout + stderr)


# ---------------------------------------------------------------------------------------------
# the real architectures


@pytest.mark.slow
def test_real_architectures_screen_and_retrieve(tmp_path, full_models_dir):
    from engine.io.vectors import load_index
    from engine.similar import similar

    images = dev_images(16)
    inp, out = _good_dir(tmp_path / "in", images), tmp_path / "out"
    code, stdout, stderr = run_cli(["screen", inp, "--out", out, "--models", full_models_dir])
    assert code == 0, stdout + stderr
    assert "resnet50" in plain(stdout) and "UNTRAINED" in plain(stdout)
    df = read_predictions(out)
    assert df.height == 16 and (df["status"] == "ok").all()
    assert df["prob"].is_between(0, 1).all()
    index = load_index(out)
    assert len(index) == 16 and index.ndim == 2048
    rows = {r["source"]: r for r in df.iter_rows(named=True)}
    for src in images[:4]:
        path = inp / src.name
        result = similar(out, str(path), k=1)
        assert result.neighbours[0].key == rows[str(path)]["key"]
