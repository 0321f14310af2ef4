"""The reader side alone: images/s of reading and decoding with 1..N decode workers, in one run.

What `cxr screen`'s decode workers do per image before inference (engine/screening.py: sha256,
header probe, DICOM tags and pixels, then the CPU default decoder's decode + resize + normalise)
over the images of --archive, held in memory, through engine.parallel.ordered_map with each
--workers count. The counts take turns over --rounds, so that a machine whose load drifts
affects them alike. No inference and no writing: this tells whether the workers scale on this
machine's cores (whether zlib, libjpeg, hashlib and NumPy release the GIL), not what
`cxr screen` reaches (bench_screen.py).

Per workers count, one JSON line in results/decode.jsonl: images/s (median over the rounds),
`speedup` (median of each round's rate / the 1-worker rate of the same round), CPU seconds per
image and `cores_busy` (process CPU time / wall: above 1 only if threads ran at once).

`gil_released` (the same in every line of a run) does not depend on the machine being idle: the
share of the per-image work's CPU time spent with the GIL released (`gil_released_share`). Near
1, N workers can use N cores; near 0, they take turns on one.

    python -m benchmarks.bench_decode --archive /tmp/cxr-perf/dicom500 --limit 32 --workers 1,2,4
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python benchmarks/bench_decode.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, Meter, append_jsonl, header, list_images, now_iso

DEFAULT_RESULTS = RESULTS / "decode.jsonl"


def run_decode_bench(
    archive: Path,
    *,
    workers: tuple[int, ...] = (1, 2, 4),
    rounds: int = 3,
    limit: int | None = 32,
    results: Path = DEFAULT_RESULTS,
    note: str = "",
) -> list[dict[str, Any]]:
    """Measure, append one line per workers count to `results`, return the lines."""
    from engine.config import CPU_DECODER
    from engine.io.archive import ImageRef, Item, image_key
    from engine.io.probe import DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE
    from engine.io.reader import prepare
    from engine.models import load_models
    from engine.parallel import ordered_map
    from engine.pipeline import decode_one
    from engine.screener import make_preprocessor

    if not workers or min(workers) < 1 or rounds < 1:
        raise ValueError("--workers needs counts of at least 1, --rounds at least 1")
    paths = list_images(archive, limit)
    if not paths:
        raise ValueError(f"no images in {archive}")
    items = [
        Item(ImageRef(image_key(str(p), None), str(p), None), p.read_bytes(), None) for p in paths
    ]
    pre = make_preprocessor(load_models(None), CPU_DECODER, device="cpu", batch_size=1, threads=1)

    def one(item: Item) -> bool:
        p = prepare(item, max_pixels=DEFAULT_MAX_PIXELS, min_side=DEFAULT_MIN_SIDE)
        return p.sample is not None and not isinstance(decode_one(pre, p.sample), str)

    counts = (1, *[w for w in workers if w != 1])  # 1 worker first: the speedups' baseline
    rates: dict[int, list[float]] = {w: [] for w in counts}
    cpu: dict[int, list[float]] = {w: [] for w in counts}
    busy: dict[int, list[float]] = {w: [] for w in counts}
    for item in items[:2]:  # warm-up: imports, first-call set-up
        one(item)
    ok = 0
    for _ in range(rounds):
        for w in counts:
            with Meter() as m:
                ok = sum(ordered_map(one, items, workers=w))
            rates[w].append(len(items) / m.wall_s)
            cpu[w].append(m.cpu_s / len(items))
            busy[w].append(m.cpu_s / m.wall_s)
    gil = gil_released_share(lambda: sum(one(item) for item in items))
    base = header("decode", uuid.uuid4().hex[:12])
    lines = []
    for w in counts:
        if w not in workers:
            continue
        speedups = [r / r1 for r, r1 in zip(rates[w], rates[1], strict=True)]
        line = {
            **base,
            "timestamp": now_iso(),
            "config": {
                "archive": str(archive),
                "images": len(items),
                "workers": w,
                "rounds": rounds,
                "decoder": CPU_DECODER,
                "note": note,
            },
            "status": "ok",
            "result": {
                "images_ok": ok,
                "images_per_s": statistics.median(rates[w]),
                "images_per_s_rounds": [round(r, 3) for r in rates[w]],
                "speedup": statistics.median(speedups),
                "speedup_rounds": [round(s, 3) for s in speedups],
                "cpu_s_per_image": statistics.median(cpu[w]),
                "cores_busy": statistics.median(busy[w]),
                "gil_released": gil,
            },
        }
        append_jsonl(results, line)
        lines.append(line)
    return lines


def gil_released_share(work: Callable[[], object]) -> float:
    """The share of `work`'s CPU time spent with the GIL released: ~1 for hashing a big buffer,
    ~0 for a pure-Python loop.

    A probe thread of pure Python runs beside `work`. With a switch interval of a minute, Python
    code never hands the GIL over on its own, so the probe runs only while `work` is inside a C
    call that released it, and `work` gets it back whenever the probe hashes its 4 KiB chunk
    (hashlib releases the GIL above 2 KiB, without a system call). probe CPU / work CPU (thread
    CPU times: waiting for a core is not counted, so other processes' load changes how long this
    takes, not the ratio) is then the released share, the two threads sharing the cores fairly.
    """
    done = threading.Event()
    spent: dict[str, float] = {}
    failed: list[BaseException] = []

    def run() -> None:
        t = time.thread_time()
        try:
            work()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            failed.append(exc)
        finally:
            spent["work"] = time.thread_time() - t
            done.set()

    interval = sys.getswitchinterval()
    sys.setswitchinterval(60.0)
    try:
        thread = threading.Thread(target=run, name="gil-work")
        t = time.thread_time()
        thread.start()
        chunk, x = b"x" * 4096, 0
        while not done.is_set():
            for _ in range(50):
                x += 1
            hashlib.sha256(chunk)
        probe = time.thread_time() - t
        thread.join()
    finally:
        sys.setswitchinterval(interval)
    if failed:
        raise failed[0]
    return round(probe / spent["work"], 3) if spent["work"] > 0 else 0.0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--archive", type=Path, required=True, help="a tree of images")
    p.add_argument("--workers", default="1,2,4", help="comma list of worker counts")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--limit", type=int, default=32, help="first N images of --archive")
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    p.add_argument("--note", default="", help="recorded in each line (e.g. 'machine busy')")
    a = p.parse_args(argv)
    try:
        workers = tuple(int(x) for x in a.workers.split(",") if x.strip())
        lines = run_decode_bench(
            a.archive,
            workers=workers,
            rounds=a.rounds,
            limit=a.limit,
            results=a.results,
            note=a.note,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for line in lines:
        r = line["result"]
        print(
            f"workers {line['config']['workers']:3d}: {r['images_per_s']:7.2f} img/s  "
            f"x{r['speedup']:.2f} vs 1  {1000 * r['cpu_s_per_image']:6.0f} ms CPU/img  "
            f"{r['cores_busy']:.2f} cores busy  GIL released {r['gil_released']:.0%}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
