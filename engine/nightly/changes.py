"""Which screened files changed or vanished since they were screened.

Only rows under tonight's inputs are checked (a directory input covers every row whose `source`
lies below it; a file or archive input, the rows of that file or archive): an output directory
may hold rows of inputs that tonight's command does not name, and those are not looked at.

Plain files: a file whose size and mtime (`os.stat`) equal those recorded in its row
(`source_size`, `source_mtime_ns`) is unchanged, without reading it. Otherwise it is read and its
sha256 compared with the row's: equal -> "touched" (the stat is remembered in
`changes/verified.parquet`, so the file is not read again while it stays so), different ->
"changed". Archives: an archive whose stat equals the one recorded with its members' rows (or
remembered) is unchanged; otherwise it is read once, every member hashed and compared, and
members no longer in it are vanished. What that read found is remembered with the archive's
stat (the missing members with it, so they are reported again without a read) once no member
differs from its current row: at once, or after the run that rescreened the changed ones. A file or member that no longer exists is "vanished": it
is reported, and its row stays in the output.

Rows without a recorded stat (directories written before these columns existed) are only read
when asked (`hash_unknown`, which `--rescreen-changed` sets): reading a whole archive to find
out is what a user should choose. After one such pass their stats are remembered. Rows whose
bytes were never read (sha256 null: a refused symlink, a file missing when named) are only
checked for existence.

What is found is written to `changes/RUN_ID.parquet` (key, source, member, change, old and new
sha256), for `cxr runs --show`; counts and a few examples go into run.json.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from engine.io import parquet
from engine.io.archive import iter_items

CHANGES = "changes"
VERIFIED = "verified.parquet"
SAMPLES = 20  # examples of each kind kept in run.json; the full list is in the run's file

CHANGE_SCHEMA: dict[str, pl.DataType] = {
    "key": pl.UInt64(),
    "source": pl.String(),
    "member": pl.String(),
    "change": pl.String(),  # "changed" | "vanished"
    "old_sha256": pl.String(),
    "new_sha256": pl.String(),
}
_VERIFIED_SCHEMA: dict[str, pl.DataType] = {
    "source": pl.String(),
    "size": pl.Int64(),
    "mtime_ns": pl.Int64(),
    "sha256": pl.String(),  # of a plain file; null for an archive
    "missing": pl.List(pl.UInt64()),  # an archive's members with rows but no longer in it
}
Verified = dict[str, tuple[int, int, str | None, tuple[int, ...]]]
_HASH_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class FileChange:
    key: int
    source: str
    member: str | None
    change: str
    old_sha256: str | None = None
    new_sha256: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "source": self.source,
            "member": self.member,
            "change": self.change,
            "old_sha256": self.old_sha256,
            "new_sha256": self.new_sha256,
        }


@dataclass
class ChangeReport:
    """What the check before a run found among the rows under its inputs."""

    checked: int = 0  # current rows under the inputs
    touched: int = 0  # stat differed, content the same
    unverified: int = 0  # no recorded stat, not read (hash_unknown off)
    unreadable: int = 0  # exists but could not be read now: left as it is
    files_read: int = 0  # plain files and archives read to compare their content
    changes: list[FileChange] = field(default_factory=list)
    new_vanished: int = 0  # vanished now, not reported by the previous run
    # archives read tonight with changed members: remembered once those are rescreened
    pending: dict[str, tuple[int, int, tuple[int, ...], frozenset[int]]] = field(
        default_factory=dict
    )

    @property
    def changed(self) -> list[FileChange]:
        return [c for c in self.changes if c.change == "changed"]

    @property
    def vanished(self) -> list[FileChange]:
        return [c for c in self.changes if c.change == "vanished"]

    def changed_keys(self) -> set[int]:
        return {c.key for c in self.changed}

    def to_json(self) -> dict[str, Any]:
        changed, vanished = self.changed, self.vanished
        return {
            "checked": self.checked,
            "changed": len(changed),
            "vanished": len(vanished),
            "new_vanished": self.new_vanished,
            "touched": self.touched,
            "unverified": self.unverified,
            "unreadable": self.unreadable,
            "files_read": self.files_read,
            "changed_samples": [_where(c) for c in changed[:SAMPLES]],
            "vanished_samples": [_where(c) for c in vanished[:SAMPLES]],
        }


def _where(c: FileChange) -> str:
    return f"{c.source}:{c.member}" if c.member else c.source


def changes_path(out: Path, run_id: str) -> Path:
    return Path(out) / CHANGES / f"{run_id}.parquet"


def read_changes(out: Path, run_id: str) -> pl.DataFrame:
    """The changes a run found (empty when it found none or predates the check)."""
    path = changes_path(out, run_id)
    if not path.is_file():
        return pl.DataFrame(schema=CHANGE_SCHEMA)
    return pl.read_parquet(path)


def check(
    out: Path,
    inputs: list[Path] | tuple[Path, ...],
    *,
    run_id: str,
    previous_run_id: str | None = None,
    hash_unknown: bool = False,
) -> ChangeReport:
    """Compare the current rows under `inputs` with the files; write what was found.

    Call while holding the output lock: it rewrites `changes/verified.parquet`.
    """
    out = Path(out)
    _remove_temporaries(out)
    report = ChangeReport()
    schema = parquet.directory_schema(out)
    lf = parquet.scan_predictions(out)
    if schema is None or lf is None:
        return report
    has_stat = "source_size" in schema and "source_mtime_ns" in schema
    roots = [os.path.abspath(os.fsdecode(p)) for p in inputs]
    cols = ["key", "source", "member", "sha256"]
    if has_stat:
        cols += ["source_size", "source_mtime_ns"]
    df = lf.filter(_under(roots)).select(cols).collect()
    if not has_stat:
        df = df.with_columns(
            pl.lit(None, pl.Int64()).alias("source_size"),
            pl.lit(None, pl.Int64()).alias("source_mtime_ns"),
        )
    report.checked = df.height
    verified: Verified = _read_verified(out)
    may_hash_unknown = has_stat or hash_unknown
    for key, source, sha, size, mtime in (
        df.filter(pl.col("member").is_null())
        .select("key", "source", "sha256", "source_size", "source_mtime_ns")
        .iter_rows()
    ):
        _check_plain(report, verified, key, source, sha, size, mtime, may_hash_unknown)
    members = df.filter(pl.col("member").is_not_null())
    for (source,), group in members.group_by("source", maintain_order=True):
        _check_archive(report, verified, str(source), group, may_hash_unknown)
    before = read_changes(out, previous_run_id) if previous_run_id else None
    known = set() if before is None else set(before.filter(pl.col("change") == "vanished")["key"])
    report.new_vanished = sum(1 for c in report.vanished if c.key not in known)
    if report.changes:
        frame = pl.DataFrame([c.to_json() for c in report.changes], schema=CHANGE_SCHEMA)
        _write_atomic(frame, changes_path(out, run_id))
    _write_verified(out, verified)
    return report


def _under(roots: list[str]) -> pl.Expr:
    terms = []
    for root in roots:
        prefix = root.rstrip(os.sep) + os.sep
        terms.append((pl.col("source") == root) | pl.col("source").str.starts_with(prefix))
    return pl.any_horizontal(terms) if terms else pl.lit(False)


def _check_plain(
    report: ChangeReport,
    verified: Verified,
    key: int,
    source: str,
    sha: str | None,
    size: int | None,
    mtime: int | None,
    may_hash_unknown: bool,
) -> None:
    gone = FileChange(key, source, None, "vanished", sha)
    try:
        st = os.stat(source)
    except FileNotFoundError:
        report.changes.append(gone)
        verified.pop(source, None)
        return
    except OSError:
        report.unreadable += 1
        return
    if not stat.S_ISREG(st.st_mode):
        report.changes.append(gone)
        verified.pop(source, None)
        return
    if sha is None:  # its bytes were never read: nothing to compare with
        return
    now = (st.st_size, st.st_mtime_ns)
    if now == (size, mtime) or verified.get(source) == (*now, sha, ()):
        return
    if size is None and not may_hash_unknown and source not in verified:
        report.unverified += 1
        return
    try:
        new_sha = _sha256_file(source)
    except OSError:
        report.unreadable += 1
        return
    report.files_read += 1
    if new_sha == sha:
        report.touched += 1
        verified[source] = (*now, sha, ())  # the stat before the read: a later write changes it
    else:
        report.changes.append(FileChange(key, source, None, "changed", sha, new_sha))
        verified.pop(source, None)


def _check_archive(
    report: ChangeReport,
    verified: Verified,
    source: str,
    group: pl.DataFrame,
    may_hash_unknown: bool,
) -> None:
    rows = {
        int(k): (m, s)
        for k, m, s in group.select("key", "member", "sha256").iter_rows()  # one per member
    }
    try:
        st = os.stat(source)
    except FileNotFoundError:
        for key, (member, sha) in rows.items():
            report.changes.append(FileChange(key, source, member, "vanished", sha))
        verified.pop(source, None)
        return
    except OSError:
        report.unreadable += len(rows)
        return
    now = (st.st_size, st.st_mtime_ns)
    recorded = set(group.select("source_size", "source_mtime_ns").iter_rows())
    if recorded == {now}:
        return
    remembered = verified.get(source)
    if remembered is not None and remembered[:3] == (*now, None):
        gone = set(remembered[3])
        for key, (member, sha) in rows.items():
            if key in gone:
                report.changes.append(FileChange(key, source, member, "vanished", sha))
        return
    if recorded == {(None, None)} and not may_hash_unknown and source not in verified:
        report.unverified += len(rows)
        return
    report.files_read += 1
    seen: set[int] = set()
    found: list[FileChange] = []
    for item in iter_items([source]):
        if item.ref.member is None:  # the archive itself cannot be read (any more)
            report.unreadable += len(rows) - len(seen & rows.keys())
            report.changes.extend(found)
            return
        key = item.ref.key
        seen.add(key)
        if key not in rows:
            continue  # a new member: tonight's run screens it
        member, sha = rows[key]
        new_sha = hashlib.sha256(item.data).hexdigest() if item.data is not None else None
        if sha is not None and new_sha != sha:
            found.append(FileChange(key, source, member, "changed", sha, new_sha))
    for key, (member, sha) in rows.items():
        if key not in seen:
            found.append(FileChange(key, source, member, "vanished", sha))
    report.changes.extend(found)
    missing = tuple(sorted(c.key for c in found if c.change == "vanished"))
    changed = frozenset(c.key for c in found if c.change == "changed")
    if changed:
        verified.pop(source, None)  # read again next time, unless `remember_rescreened` runs
        report.pending[source] = (*now, missing, changed)
    else:
        verified[source] = (*now, None, missing)


def remember_rescreened(out: Path, report: ChangeReport, rescreened: set[int]) -> None:
    """After a run: remember the archives whose changed members it rescreened (all of them,
    with the archive unchanged since it was read), so the next check need not read them."""
    done = {
        source: entry
        for source, entry in report.pending.items()
        if entry[3] <= rescreened and _stat(source) == entry[:2]
    }
    if done:
        verified = _read_verified(out)
        for source, (size, mtime, missing, _) in done.items():
            verified[source] = (size, mtime, None, missing)
        _write_verified(out, verified)


def _stat(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _read_verified(out: Path) -> Verified:
    path = Path(out) / CHANGES / VERIFIED
    if not path.is_file():
        return {}
    try:
        df = pl.read_parquet(path).select(list(_VERIFIED_SCHEMA))
    except (pl.exceptions.PolarsError, OSError):
        return {}  # a cache: losing it only means reading those files once more
    return {s: (z, m, h, tuple(missing or ())) for s, z, m, h, missing in df.iter_rows()}


def _write_verified(out: Path, verified: Verified) -> None:
    path = Path(out) / CHANGES / VERIFIED
    if not verified:
        path.unlink(missing_ok=True)
        return
    frame = pl.DataFrame(
        [(s, z, m, h, list(missing)) for s, (z, m, h, missing) in verified.items()],
        schema=_VERIFIED_SCHEMA,
        orient="row",
    )
    _write_atomic(frame, path)


def _write_atomic(frame: pl.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    frame.write_parquet(tmp)
    os.replace(tmp, path)


def _remove_temporaries(out: Path) -> None:
    d = Path(out) / CHANGES
    if d.is_dir():
        for p in d.iterdir():
            if p.name.startswith(".") and ".tmp" in p.name:
                p.unlink(missing_ok=True)
