"""The output directory: an exclusive lock for writers, and run.json."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from types import TracebackType
from typing import Any

from engine.errors import EngineError, OutputLocked
from engine.io.atomic import output_error, write_atomically
from engine.io.files import open_regular

LOCK = ".lock"
RUN_JSON = "run.json"


class OutputLock:
    """flock on DIR/.lock: released by the kernel if the holder dies, even by SIGKILL."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self._fd: int | None = None

    def __enter__(self) -> OutputLock:
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise EngineError(f"{self.out}: cannot create the output directory ({exc})") from None
        path = self.out / LOCK
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise output_error(path, "the lock file", exc) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise OutputLocked(
                f"{self.out} is being written by another cxr screen (pid {holder}); "
                "wait for it to finish or choose another --out"
            ) from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
        except OSError:
            pass  # the pid is only a hint for the message above; the flock is the lock
        self._fd = fd
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the flock
            self._fd = None


def read_run_json(out: Path) -> dict[str, Any] | None:
    path = Path(out) / RUN_JSON
    try:
        with open_regular(path) as f:  # a FIFO in its place would block the reader
            return json.loads(f.read())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise EngineError(f"{path}: cannot read ({exc}); it is rewritten by the next run") from None


def write_run_json(out: Path, data: dict[str, Any]) -> None:
    text = json.dumps(data, indent=2, default=str) + "\n"
    write_atomically(Path(out) / RUN_JSON, text.encode(), what=RUN_JSON)
