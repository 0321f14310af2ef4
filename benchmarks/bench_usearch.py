"""The similarity index at archive scale: usearch build and query times, recall, size on disk.

For each size (default 10^5 and 10^6) it builds the index the engine builds (2048-d, cosine, f16;
engine/io/vectors.py) from synthetic embeddings, and measures

    build_s, vectors/s      index.add of all vectors with --threads threads
    recall@k                of the approximate search against an exact scan (NumPy, float32 on
                            the same f16 values), over --queries held-out queries
    single-query latency    p50/p99 of one query at a time (one thread), per expansion_search
    batch QPS               all queries in one call with --threads threads
    bytes on disk, save_s, restore_s (view=True, memory-mapped) and load_s (into RAM)

for every connectivity x expansion_add (a build each) and expansion_search (query time only).
Sizes above --tune-up-to reuse the best (connectivity, expansion_add) of the smaller sizes: the
cheapest whose recall@k reached --target-recall, else the most accurate.

The embeddings: real ResNet features are non-negative (post-ReLU average pool), clustered and of
low intrinsic dimension. They are drawn as ReLU(W z + noise) with z from a mixture of
--clusters Gaussians in --intrinsic-dim dimensions and W a fixed random projection, then
normalised. Isotropic Gaussian noise in 2048-d would be the worst case for any graph index (all
distances alike) and says little about real embeddings; recall depends on this choice, so it is
recorded in every line.

Then `cxr similar` end to end on a small real screened run (--similar-images dev images):
p50/p99 of engine.similar.similar by key and by image file in-process, and of the `cxr similar`
command (a new process each time: interpreter start, imports, model load).

Memory: 10^6 x 2048 f16 is 4.1 GB; the index refers to the generator's array (copy=False), so
the peak is about 1.2 x that plus a 0.4 GB working chunk. Sizes that do not fit MemAvailable
are skipped and said so.

    python -m benchmarks.bench_usearch --sizes 100000,1000000
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    RESULTS,
    Meter,
    append_jsonl,
    cores,
    default_data_dir,
    header,
    list_images,
    peak_rss_mib,
    percentiles_ms,
)

DEFAULT_RESULTS = RESULTS / "usearch.jsonl"
CHUNK = 50_000


@dataclass(frozen=True)
class UsearchOptions:
    sizes: tuple[int, ...] = (100_000, 1_000_000)
    dim: int = 2048
    dtype: str = "f16"
    queries: int = 1000
    single_queries: int = 1000  # of the queries, run one at a time for the latency
    k: int = 10
    connectivity: tuple[int, ...] = (16, 32)
    expansion_add: tuple[int, ...] = (128,)
    expansion_search: tuple[int, ...] = (16, 32, 64, 128, 256, 512)
    tune_up_to: int = 100_000
    target_recall: float = 0.99
    clusters: int = 100
    intrinsic_dim: int = 128
    noise: float = 0.3
    seed: int = 0
    threads: int = field(default_factory=cores)
    similar_images: int = 64  # 0: skip the `cxr similar` part
    similar_reps: int = 20
    cli_reps: int = 5
    models: Path | None = None
    dev_images: Path = field(default_factory=lambda: default_data_dir() / "images")
    results: Path = DEFAULT_RESULTS
    workdir: Path | None = None
    quiet: bool = False


def _say(opts: UsearchOptions, text: str) -> None:
    if not opts.quiet:
        print(f"[usearch] {text}", file=sys.stderr, flush=True)


def _new_index(opts: UsearchOptions, connectivity: int, expansion_add: int):
    import onnxruntime  # noqa: F401 - before usearch, see engine/io/vectors.py
    from usearch.index import Index

    return Index(
        ndim=opts.dim,
        metric="cos",
        dtype=opts.dtype,
        connectivity=connectivity,
        expansion_add=expansion_add,
    )


# --------------------------------------------------------------------------- data


class Embeddings:
    """Clustered, non-negative, low-intrinsic-dimension unit vectors (see the module doc)."""

    def __init__(self, opts: UsearchOptions) -> None:
        rng = np.random.default_rng([opts.seed, 1])
        m = opts.intrinsic_dim
        self.opts = opts
        self.w = (rng.standard_normal((opts.dim, m)) / np.sqrt(m)).astype(np.float32)
        self.centers = (2.0 * rng.standard_normal((opts.clusters, m))).astype(np.float32)

    def draw(self, n: int, stream: int) -> np.ndarray:
        """n unit vectors as float16; `stream` picks an independent random stream."""
        out = np.empty((n, self.opts.dim), np.float16)
        for start in range(0, n, CHUNK):
            rng = np.random.default_rng([self.opts.seed, stream, start])
            c = min(CHUNK, n - start)
            z = self.centers[rng.integers(0, len(self.centers), c)]
            z = z + rng.standard_normal(z.shape, np.float32)
            x = z @ self.w.T
            x += self.opts.noise * rng.standard_normal(x.shape, np.float32)
            np.maximum(x, 0.0, out=x)
            x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
            out[start : start + c] = x
        return out


def exact_top_k(base: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Row numbers and cosines of the k nearest rows of base to each query, best first."""
    q = queries.astype(np.float32)
    q /= np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    best_s = np.full((len(q), k), -np.inf, np.float32)
    best_i = np.zeros((len(q), k), np.int64)
    for start in range(0, len(base), CHUNK):
        chunk = base[start : start + CHUNK].astype(np.float32)
        chunk /= np.maximum(np.linalg.norm(chunk, axis=1, keepdims=True), 1e-12)
        s = q @ chunk.T  # (Q, chunk)
        part = np.argpartition(-s, min(k, s.shape[1] - 1), axis=1)[:, :k]
        cand_s = np.concatenate([best_s, np.take_along_axis(s, part, 1)], axis=1)
        cand_i = np.concatenate([best_i, part + start], axis=1)
        top = np.argsort(-cand_s, axis=1, kind="stable")[:, :k]
        best_s = np.take_along_axis(cand_s, top, 1)
        best_i = np.take_along_axis(cand_i, top, 1)
    return best_i, best_s


def data_stats(base: np.ndarray, cosines: np.ndarray) -> dict[str, float]:
    """How hard the data is: cosine of random pairs vs of the 1st and k-th true neighbours."""
    sample = base[np.random.default_rng(0).choice(len(base), min(2000, len(base)), replace=False)]
    s = sample.astype(np.float32)
    c = s @ s.T
    pairs = c[np.triu_indices(len(s), 1)]
    return {
        "cosine_random_pair_mean": round(float(pairs.mean()), 4),
        "cosine_1st_neighbour_mean": round(float(cosines[:, 0].mean()), 4),
        "cosine_kth_neighbour_mean": round(float(cosines[:, -1].mean()), 4),
    }


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    hits = [len(set(f.tolist()) & set(t.tolist())) for f, t in zip(found, truth, strict=True)]
    return float(np.mean(hits)) / truth.shape[1]


# --------------------------------------------------------------------------- index


def measure_index(
    opts: UsearchOptions,
    base: np.ndarray,
    queries: np.ndarray,
    truth: np.ndarray,
    connectivity: int,
    expansion_add: int,
    work: Path,
) -> dict[str, Any]:
    n = len(base)
    index = _new_index(opts, connectivity, expansion_add)
    keys = np.arange(n, dtype=np.uint64)
    with Meter() as build:
        for start in range(0, n, CHUNK):
            end = min(n, start + CHUNK)
            index.add(keys[start:end], base[start:end], copy=False, threads=opts.threads)
            if n > CHUNK:
                done = end / n
                eta = build.elapsed() * (1 - done) / done
                _say(opts, f"  build {end}/{n} ({build.elapsed():.0f} s, ~{eta:.0f} s left)")
    searches = []
    for es in opts.expansion_search:
        index.expansion_search = es
        t = time.perf_counter()
        batch = index.search(queries, opts.k, threads=opts.threads)
        batch_s = time.perf_counter() - t
        lat = []
        for q in queries[: opts.single_queries]:
            t = time.perf_counter()
            index.search(q, opts.k)
            lat.append(time.perf_counter() - t)
        searches.append(
            {
                "expansion_search": es,
                "recall_at_k": recall_at_k(np.asarray(batch.keys, np.int64), truth),
                "single_query_ms": percentiles_ms(lat),
                "batch_qps": len(queries) / batch_s,
            }
        )
        _say(
            opts,
            f"  M={connectivity} ef_add={expansion_add} ef={es}: recall@{opts.k} "
            f"{searches[-1]['recall_at_k']:.4f}, p50 {searches[-1]['single_query_ms']['p50']:.2f} ms",
        )
    path = work / f"index-{n}-{connectivity}-{expansion_add}.usearch"
    t = time.perf_counter()
    index.save(str(path))
    save_s = time.perf_counter() - t
    size = path.stat().st_size
    del index
    from usearch.index import Index

    t = time.perf_counter()
    viewed = Index.restore(str(path), view=True)
    restore_s = time.perf_counter() - t
    del viewed
    t = time.perf_counter()
    loaded = Index.restore(str(path), view=False)
    load_s = time.perf_counter() - t
    del loaded
    path.unlink()
    return {
        "size": n,
        "connectivity": connectivity,
        "expansion_add": expansion_add,
        "build_s": round(build.wall_s, 3),
        "build_vectors_per_s": n / build.wall_s if build.wall_s else None,
        "build_cpu_utilisation": round(build.utilisation(), 4),
        "searches": searches,
        "bytes_on_disk": size,
        "bytes_per_vector": size / n,
        "save_s": round(save_s, 3),
        "restore_view_s": round(restore_s, 4),
        "load_s": round(load_s, 3),
    }


def best_setting(results: list[dict[str, Any]], target: float) -> tuple[int, int]:
    """The cheapest (connectivity, expansion_add) whose best recall met target, else the best."""
    scored = []
    for r in results:
        top = max(s["recall_at_k"] for s in r["searches"])
        ok = [s for s in r["searches"] if s["recall_at_k"] >= target]
        p50 = min((s["single_query_ms"]["p50"] for s in ok), default=float("inf"))
        scored.append((not ok, p50, -top, r["build_s"], r["connectivity"], r["expansion_add"]))
    scored.sort()
    return scored[0][4], scored[0][5]


def fits_in_memory(opts: UsearchOptions, n: int) -> tuple[bool, str]:
    need = 1.25 * n * opts.dim * 2 + 4 * CHUNK * opts.dim * 4
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
                return (
                    need < 0.9 * avail,
                    f"needs ~{need / 2**30:.1f} GiB, {avail / 2**30:.1f} available",
                )
    except OSError:
        pass
    return True, "memory not checked"


# --------------------------------------------------------------------------- cxr similar


def measure_similar(opts: UsearchOptions, work: Path) -> dict[str, Any]:
    from engine.config import ScreenConfig
    from engine.io import parquet
    from engine.models import init_models
    from engine.runner import screen
    from engine.similar import similar

    models = opts.models
    if models is None:
        models = work / "models"
        if not (models / "classifier.json").is_file():
            init_models(models, size="full", seed=0)
    images = list_images(opts.dev_images, opts.similar_images)
    out = work / "similar-run"
    screen(
        ScreenConfig(
            inputs=tuple(images), out=out, models=models, threads=opts.threads, progress=False
        )
    )
    keys = parquet.read_predictions(out, ["key"])["key"].to_list()
    query_file = str(images[len(images) // 2])

    def timed(fn, reps: int) -> dict[str, float]:
        fn()  # warm-up (page cache, imports)
        lat = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            lat.append(time.perf_counter() - t)
        return percentiles_ms(lat)

    by_key = timed(lambda: similar(out, str(keys[0]), k=10), opts.similar_reps)
    by_file = timed(lambda: similar(out, query_file, k=10, models_dir=models), opts.similar_reps)
    result: dict[str, Any] = {
        "images_in_index": len(keys),
        "models": str(models),
        "in_process_by_key_ms": by_key,
        "in_process_by_file_ms": by_file,
    }
    if opts.cli_reps > 0:
        cxr = Path(sys.executable).with_name("cxr")
        cmd = [str(cxr)] if cxr.is_file() else [sys.executable, "-m", "engine.cli"]

        def cli(query: str) -> None:
            subprocess.run(
                [*cmd, "similar", query, "--out", str(out), "--json", "--models", str(models)],
                check=True,
                capture_output=True,
            )

        result["cli_by_key_ms"] = timed(lambda: cli(str(keys[0])), opts.cli_reps)
        result["cli_by_file_ms"] = timed(lambda: cli(query_file), opts.cli_reps)
    return result


# --------------------------------------------------------------------------- driver


def run(opts: UsearchOptions) -> list[dict[str, Any]]:
    cleanup = None
    if opts.workdir is None:
        cleanup = tempfile.TemporaryDirectory(prefix="cxr-bench-usearch-")
        work = Path(cleanup.name)
    else:
        work = Path(opts.workdir)
        work.mkdir(parents=True, exist_ok=True)
    base_rec = header("usearch", uuid.uuid4().hex[:12])
    data_desc = {
        "dim": opts.dim,
        "dtype": opts.dtype,
        "metric": "cos",
        "generator": "relu(W z + noise), z ~ mixture of Gaussians; unit rows",
        "clusters": opts.clusters,
        "intrinsic_dim": opts.intrinsic_dim,
        "noise": opts.noise,
        "seed": opts.seed,
        "queries": opts.queries,
        "k": opts.k,
        "threads": opts.threads,
    }
    records: list[dict[str, Any]] = []
    try:
        gen = Embeddings(opts)
        queries = gen.draw(opts.queries, stream=0)
        tuned: list[dict[str, Any]] = []
        for n in opts.sizes:
            ok, why = fits_in_memory(opts, n)
            if not ok:
                rec = {**base_rec, "kind": "index", "size": n, "status": "skipped", "reason": why}
                append_jsonl(opts.results, rec)
                records.append(rec)
                _say(opts, f"size {n}: skipped ({why})")
                continue
            _say(opts, f"size {n}: drawing embeddings")
            base = gen.draw(n, stream=1)
            t = time.perf_counter()
            truth, cosines = exact_top_k(base, queries, opts.k)
            exact_s = time.perf_counter() - t
            stats = data_stats(base, cosines)
            if n <= opts.tune_up_to or not tuned:
                settings = [(m, e) for m in opts.connectivity for e in opts.expansion_add]
            else:
                settings = [best_setting(tuned, opts.target_recall)]
            for m, e in settings:
                _say(opts, f"size {n}: building M={m} ef_add={e}")
                r = measure_index(opts, base, queries, truth, m, e, work)
                r["exact_numpy_s"] = round(exact_s, 3)
                r["peak_rss_mib"] = round(peak_rss_mib(), 1)
                if n <= opts.tune_up_to:
                    tuned.append(r)
                data = {**data_desc, **stats}
                rec = {**base_rec, "kind": "index", "status": "ok", "data": data, "result": r}
                append_jsonl(opts.results, rec)
                records.append(rec)
            del base
        if opts.similar_images > 0:
            _say(opts, "cxr similar on a small real screened run")
            rec = {
                **base_rec,
                "kind": "similar",
                "status": "ok",
                "result": measure_similar(opts, work),
            }
            append_jsonl(opts.results, rec)
            records.append(rec)
    finally:
        if cleanup is not None:
            cleanup.cleanup()
    if not opts.quiet:
        print(format_table(records, opts))
    return records


def format_table(records: list[dict[str, Any]], opts: UsearchOptions) -> str:
    lines = [
        f"{'size':>9s} {'M':>3s} {'ef_add':>6s} {'build s':>8s} {'MB':>7s} {'ef':>4s} "
        f"{'recall@' + str(opts.k):>9s} {'p50 ms':>7s} {'p99 ms':>7s} {'QPS':>8s}"
    ]
    for rec in records:
        if rec["kind"] == "similar":
            r = rec["result"]
            for key in (
                "in_process_by_key_ms",
                "in_process_by_file_ms",
                "cli_by_key_ms",
                "cli_by_file_ms",
            ):
                if key in r:
                    lines.append(
                        f"cxr similar {key[:-3]:22s} p50 {r[key]['p50']:8.1f} ms  p99 {r[key]['p99']:8.1f} ms"
                    )
            continue
        if rec["status"] != "ok":
            lines.append(f"{rec['size']:9d} skipped: {rec['reason']}")
            continue
        r = rec["result"]
        for s in r["searches"]:
            lines.append(
                f"{r['size']:9d} {r['connectivity']:3d} {r['expansion_add']:6d} {r['build_s']:8.1f} "
                f"{r['bytes_on_disk'] / 1e6:7.1f} {s['expansion_search']:4d} {s['recall_at_k']:9.4f} "
                f"{s['single_query_ms']['p50']:7.2f} {s['single_query_ms']['p99']:7.2f} {s['batch_qps']:8.0f}"
            )
    return "\n".join(lines)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(float(x)) for x in text.split(",") if x.strip())


def main(argv: list[str] | None = None) -> int:
    d = UsearchOptions()
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sizes", default="100000,1000000", help="index sizes, e.g. 1e5,1e6")
    p.add_argument("--dim", type=int, default=d.dim)
    p.add_argument("--dtype", default=d.dtype, help="f16 (the engine's), f32, bf16, i8")
    p.add_argument("--queries", type=int, default=d.queries)
    p.add_argument("--single-queries", type=int, default=d.single_queries)
    p.add_argument("-k", type=int, default=d.k)
    p.add_argument("--connectivity", default="16,32")  # the engine uses usearch's 16
    p.add_argument("--expansion-add", default="128")
    p.add_argument("--expansion-search", default="16,32,64,128,256,512")
    p.add_argument("--tune-up-to", type=int, default=d.tune_up_to)
    p.add_argument("--target-recall", type=float, default=d.target_recall)
    p.add_argument("--clusters", type=int, default=d.clusters)
    p.add_argument("--intrinsic-dim", type=int, default=d.intrinsic_dim)
    p.add_argument("--noise", type=float, default=d.noise)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--similar-images", type=int, default=d.similar_images, help="0: skip")
    p.add_argument("--similar-reps", type=int, default=d.similar_reps)
    p.add_argument("--cli-reps", type=int, default=d.cli_reps)
    p.add_argument("--models", type=Path)
    p.add_argument("--dev-images", type=Path, default=d.dev_images)
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    p.add_argument("--workdir", type=Path)
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    opts = UsearchOptions(
        sizes=_ints(a.sizes),
        dim=a.dim,
        dtype=a.dtype,
        queries=a.queries,
        single_queries=min(a.single_queries, a.queries),
        k=a.k,
        connectivity=_ints(a.connectivity),
        expansion_add=_ints(a.expansion_add),
        expansion_search=_ints(a.expansion_search),
        tune_up_to=a.tune_up_to,
        target_recall=a.target_recall,
        clusters=a.clusters,
        intrinsic_dim=a.intrinsic_dim,
        noise=a.noise,
        seed=a.seed,
        threads=a.threads,
        similar_images=a.similar_images,
        similar_reps=a.similar_reps,
        cli_reps=a.cli_reps,
        models=a.models,
        dev_images=a.dev_images,
        results=a.results,
        workdir=a.workdir,
        quiet=a.quiet,
    )
    run(opts)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
