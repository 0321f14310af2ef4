"""The overhead of the engine on Ray: `cxr screen --ray local` against the single-process engine.

Both screen the same archive on this machine, each as a real `cxr screen` child process (so
imports, model loading, Ray's start and the index merge all count), alternating A B B A ... so
that drift on a shared machine falls on both. Per run: images/s end to end (the child's wall
time), images/s inside the run (run.json's wall_s: for Ray it includes starting the actors)
and, for Ray, the steady per-node rate (images over the span from the first shard's start to
the last shard's end, from run.json's per_node figures). The ratio Ray / single process of
each goes in a summary line, with what a scale plan needs: output bytes per image (Parquet,
thumbnails, index) and the driver's listing rate and shard payload per image.

One JSON line per run and one summary line go to benchmarks/results/ray.jsonl.

    python -m benchmarks.bench_ray --archive /tmp/cxr-bench-600 --pairs 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python benchmarks/bench_ray.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import REPO, RESULTS, append_jsonl, cores, header

DEFAULT_RESULTS = RESULTS / "ray.jsonl"
FLAGS_OF_INTEREST = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16", "fma")


def cpu_flags() -> list[str]:
    """The CPU's flags line (/proc/cpuinfo), all of them."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line.split(":", 1)[1].split()
    except OSError:
        pass
    return []


def screen_once(mode: str, archive: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, "-m", "engine.cli", "screen", str(archive), "--out", str(out)]
    command += ["--no-progress", "--threads", str(args.threads)]
    command += ["--batch-size", str(args.batch_size), "--shard-size", str(args.shard_size)]
    if args.models:
        command += ["--models", str(args.models)]
    if mode == "ray":
        command += ["--ray", "local"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    load_before = os.getloadavg()[0]
    cpu_before = _children_cpu_s()
    t = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    e2e = time.perf_counter() - t
    unreaped = _reap_orphans()
    cpu = _children_cpu_s() - cpu_before
    if done.returncode not in (0, 3):
        raise SystemExit(f"{mode} run failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    record = json.loads((out / "run.json").read_text())
    images = record["counts"]["processed"]
    result: dict[str, Any] = {
        "mode": mode,
        "images": images,
        "e2e_s": round(e2e, 3),
        "e2e_images_per_s": round(images / e2e, 3),
        "cpu_s": round(cpu, 3),
        "cpu_s_per_image": round(cpu / images, 4),
        "descendants_unreaped": unreaped,
        "in_run_s": round(record["timings"]["wall_s"], 3),
        "in_run_images_per_s": round(record["timings"]["images_per_s"], 3),
        "stage_busy_s": record["timings"]["stage_busy_s"],
        "backend": record["backend"],
        "decoder": record["decoder"],
        "errors": record["counts"]["error"],
        "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    cluster = record.get("cluster")
    if cluster:
        nodes = cluster.get("per_node", [])
        span = max((n["wall_s"] for n in nodes), default=0.0)
        result["steady_images_per_s"] = round(images / span, 3) if span else 0.0
        result["cluster"] = {k: cluster[k] for k in ("ray_version", "cpus", "actors", "per_node")}
    return result


def _become_subreaper() -> None:
    """Orphaned descendants (Ray daemons whose parent exited first) become our children, so
    that reaping them adds their CPU time to RUSAGE_CHILDREN (Linux only; else a no-op)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass


def _reap_orphans(timeout_s: float = 60.0) -> int:
    """Wait for the descendants still running after the CLI exited; how many did not end."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return 0
        if pid == 0:
            time.sleep(0.1)
    try:
        return len(Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split())
    except OSError:
        return -1


def _children_cpu_s() -> float:
    """CPU seconds of every finished descendant (Ray's processes are the CLI's descendants
    with --ray local, and are reaped at its shutdown). Unlike wall time, this does not depend
    on how much of the machine other jobs take, so it measures the overhead on a shared one."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def output_sizes(out: Path, images: int, ok: int) -> dict[str, float]:
    def size(sub: str) -> int:
        return sum(p.stat().st_size for p in (out / sub).glob("*") if p.is_file())

    return {
        "parquet_bytes_per_row": round(size("predictions") / images, 1),
        "thumbs_bytes_per_ok_image": round(size("thumbs") / ok, 1),
        "index_bytes_per_vector": round((out / "index.usearch").stat().st_size / ok, 1),
    }


def listing_figures(archive: Path, shard_size: int) -> dict[str, float]:
    """What the driver does alone: list without reading image bytes, and the shard payloads."""
    import tracemalloc

    from engine.io.shards import list_entries, plan_shards

    tracemalloc.start()
    t = time.perf_counter()
    entries = list(list_entries([str(archive)]))
    seconds = time.perf_counter() - t
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    payload = sum(len(s.to_json()) for s in plan_shards(entries, shard_size, 0))
    n = max(1, len(entries))
    return {
        "entries": len(entries),
        "listing_entries_per_s": round(len(entries) / seconds, 1),
        "listing_bytes_per_entry": round(peak / n, 1),
        "shard_json_bytes_per_entry": round(payload / n, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--archive", type=Path, required=True, help="what to screen (a directory)")
    p.add_argument("--models", type=Path, default=None, help="default: the shipped models")
    p.add_argument("--pairs", type=int, default=2, help="pairs of runs, order A B B A ...")
    p.add_argument("--threads", type=int, default=cores())
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--shard-size", type=int, default=256)
    p.add_argument("--work", type=Path, default=None, help="output directories (default: a temp)")
    p.add_argument("--note", default="", help="recorded as is (e.g. what else ran meanwhile)")
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    args = p.parse_args(argv)

    run_id = uuid.uuid4().hex[:12]
    _become_subreaper()
    work = args.work or Path(tempfile.mkdtemp(prefix="cxr-bench-ray-"))
    flags = cpu_flags()
    base = {
        **header("ray", run_id),
        "cpu_flags": flags,
        "cpu_flags_of_interest": [f for f in FLAGS_OF_INTEREST if f in flags],
        "note": args.note,
        "options": {
            "archive": str(args.archive),
            "models": str(args.models) if args.models else "shipped",
            "threads": args.threads,
            "batch_size": args.batch_size,
            "shard_size": args.shard_size,
        },
    }
    runs: list[dict[str, Any]] = []
    for i in range(args.pairs):
        for mode in ("local", "ray") if i % 2 == 0 else ("ray", "local"):
            out = work / f"{mode}-{i}"
            result = screen_once(mode, args.archive, out, args)
            print(
                json.dumps({k: result[k] for k in ("mode", "images", "e2e_s", "in_run_s", "cpu_s")})
            )
            append_jsonl(args.results, {**base, "kind": "run", "result": result})
            runs.append(result)

    def rate(mode: str, seconds: str) -> float:
        chosen = [r for r in runs if r["mode"] == mode]
        return sum(r["images"] for r in chosen) / sum(r[seconds] for r in chosen)

    def cpu_per_image(mode: str) -> float:
        chosen = [r for r in runs if r["mode"] == mode]
        return sum(r["cpu_s"] for r in chosen) / sum(r["images"] for r in chosen)

    local_out = work / "local-0"
    record = json.loads((local_out / "run.json").read_text())
    ray_runs = [r for r in runs if r["mode"] == "ray"]
    steady = sum(r["images"] for r in ray_runs) / sum(
        r["images"] / r["steady_images_per_s"] for r in ray_runs
    )
    summary = {
        "local_e2e_images_per_s": round(rate("local", "e2e_s"), 3),
        "ray_e2e_images_per_s": round(rate("ray", "e2e_s"), 3),
        "ratio_e2e": round(rate("ray", "e2e_s") / rate("local", "e2e_s"), 3),
        "local_in_run_images_per_s": round(rate("local", "in_run_s"), 3),
        "ray_in_run_images_per_s": round(rate("ray", "in_run_s"), 3),
        "ratio_in_run": round(rate("ray", "in_run_s") / rate("local", "in_run_s"), 3),
        "local_cpu_s_per_image": round(cpu_per_image("local"), 4),
        "ray_cpu_s_per_image": round(cpu_per_image("ray"), 4),
        "ratio_cpu": round(cpu_per_image("local") / cpu_per_image("ray"), 3),
        "ray_steady_images_per_s": round(steady, 3),
        "ratio_steady": round(steady / rate("local", "in_run_s"), 3),
        "runs": len(runs),
        "outputs": output_sizes(local_out, record["counts"]["processed"], record["counts"]["ok"]),
        "driver": listing_figures(args.archive, args.shard_size),
    }
    append_jsonl(args.results, {**base, "kind": "summary", "result": summary})
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
