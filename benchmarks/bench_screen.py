"""Throughput of `cxr screen`, against a naive baseline and two ceilings, in one run.

Configurations, each in its own child process (so that peak memory and warm caches do not mix):

    model-only   both models from RAM, ONNX Runtime, per precision and batch size: the ceiling
                 of inference alone (the best of them is "the model-only ceiling"); a
                 classifier with test-time crops runs on that many crops an image
    naive        benchmarks/naive.py: a plain per-image loop with the same FP32 models and the
                 same preprocessing (Pillow/pydicom + NumPy), what a researcher would write
    null         engine.runner.screen with the null backend: the harness alone (read, decode,
                 crop, write), i.e. the ceiling set by everything but inference
    engine       engine.runner.screen on a fresh output directory, one per combination of
                 precision x batch size x decoder x thread split

Per configuration: images/s end to end (the whole `screen` call: model loading, index merge
and all), per stage images/s (images / busy seconds of that stage; stages overlap), p50/p99
batch latency, peak RSS, CPU utilisation (CPU time / wall / cores). Ratios: engine / naive,
engine / model-only ceiling, engine / null. Beside each faster engine configuration, its
agreement with the FP32 DALI reference (benchmarks/quality.py) on the benchmark images and on
the real dev images (with their labels). One JSON line per configuration goes to
benchmarks/results/screen.jsonl.

Levers (for the thread split, the Pillow decoders and anything the runner does not expose yet,
the child process patches engine.screener before it screens; nothing in the engine changes):

    --precision fp32,int8          (INT8 exports that do not exist are reported as skipped)
    --batch-size 1,8,16,32
    --decoder auto,dali,pillow,pillow-draft,pillow-draft1
                                   auto = the engine as `cxr screen` runs it (nothing patched);
                                   pillow = engine/pipeline_pil.py, full decode;
                                   pillow-draftK = JPEG DCT scaling to >= K x the work size
    --thread-split 2:2,1:2         DALI (decode) threads : ONNX Runtime intra-op threads
    --decode-workers 0,1,4         threads that read and (Pillow) decode images side by side
                                   (`cxr screen --decode-workers`); 0: as many as decode threads
    --rounds 3                     the whole plan three times in a row, each round a run of its
                                   own (its run id, its ratios; `series` and `round` tie them),
                                   then the median and range of each rate and ratio: the naive
                                   loop's rate varies by up to ~35% between runs on a shared VM

    python -m benchmarks.bench_screen --archive /tmp/bench-2000 --limit 500
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python benchmarks/bench_screen.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    REPO,
    RESULTS,
    append_jsonl,
    cores,
    default_data_dir,
    header,
    list_images,
    now_iso,
)
from benchmarks.screen_worker import Config, decoder_draft, worker
from engine.errors import ConfigError, ModelError

KINDS = ("model-only", "naive", "null", "engine")
STAGES = ("read", "decode+preprocess", "segment", "crop", "classify", "write")
DEFAULT_RESULTS = RESULTS / "screen.jsonl"


@dataclass(frozen=True)
class BenchOptions:
    archive: Path | None = None  # directory tree, image file list root, or .tar; None: dev images
    models: Path | None = None  # None: `cxr models init` (full, untrained) into the work dir
    precisions: tuple[str, ...] = ("fp32", "int8")
    batch_sizes: tuple[int, ...] = (16,)
    threads: int = field(default_factory=cores)
    thread_splits: tuple[tuple[int, int], ...] = ()  # (decode, ort); none: `threads` for both
    decoders: tuple[str, ...] = ("dali",)
    decode_workers: tuple[int, ...] = (0,)  # 0: as many as the decode threads (the default)
    limit: int | None = None
    naive_limit: int | None = 100
    warmup: int | None = None  # images; None: two batches
    configs: tuple[str, ...] = KINDS
    model_only_images: int = 64
    quality: bool = True  # agreement of every engine configuration with the reference
    quality_limit: int | None = None  # dev images screened per configuration (None: all)
    dev_images: Path = field(default_factory=lambda: default_data_dir() / "images")
    labels: Path | None = field(default_factory=lambda: default_data_dir() / "labels.csv")
    results: Path = DEFAULT_RESULTS
    workdir: Path | None = None  # None: a temporary directory, removed unless keep
    keep: bool = False
    quiet: bool = False
    rounds: int = 1  # the whole plan this many times, interleaved; ratios per round, medians

    def __post_init__(self) -> None:
        bad = [k for k in self.configs if k not in KINDS]
        if bad or not self.configs:
            raise ConfigError(f"--configs takes {', '.join(KINDS)}; got {', '.join(bad) or 'none'}")
        if not self.batch_sizes or any(not 1 <= b <= 4096 for b in self.batch_sizes):
            raise ConfigError(f"--batch-size values must be 1..4096, got {self.batch_sizes}")
        if any(p not in ("fp32", "int8") for p in self.precisions) or not self.precisions:
            raise ConfigError(f"--precision takes fp32 and/or int8, got {self.precisions}")
        for d in self.decoders:
            decoder_draft(d)
        if self.threads < 1 or any(min(s) < 1 for s in self.thread_splits):
            raise ConfigError("thread counts must be at least 1")
        if not self.decode_workers or any(w < 0 for w in self.decode_workers):
            raise ConfigError(
                f"--decode-workers values must be 0 or more, got {self.decode_workers}"
            )
        for name, n in (("--limit", self.limit), ("--naive-limit", self.naive_limit)):
            if n is not None and n < 1:
                raise ConfigError(f"{name} must be at least 1, not {n}")
        if self.rounds < 1:
            raise ConfigError(f"--rounds must be at least 1, not {self.rounds}")
        if self.archive is not None and not Path(self.archive).exists():
            raise ConfigError(f"--archive {self.archive} does not exist")


# --------------------------------------------------------------------------- plan


def plan(opts: BenchOptions) -> list[Config]:
    """The configurations to run, in order: ceilings and baseline first, reference engine next."""
    splits = opts.thread_splits or ((opts.threads, opts.threads),)
    t = opts.threads
    first_b = 16 if 16 in opts.batch_sizes else opts.batch_sizes[0]
    out: list[Config] = []
    if "model-only" in opts.configs:
        out += [
            Config(kind="model-only", precision=p, batch_size=b, ort_threads=t, decode_threads=t)
            for p in opts.precisions
            for b in opts.batch_sizes
        ]
    if "naive" in opts.configs:
        out.append(Config(kind="naive", precision="fp32", ort_threads=t, decode_threads=t))
    if "null" in opts.configs:  # the harness ceiling of each decoder
        null = Config(kind="null", batch_size=first_b, decode_threads=t, ort_threads=t)
        out += [
            replace(null, decoder=d, decode_workers=w)
            for d in opts.decoders
            for w in opts.decode_workers
        ]
    if "engine" in opts.configs:
        ref = Config(
            kind="engine", batch_size=first_b, decode_threads=t, ort_threads=t, reference=True
        )
        sweep = [
            Config(
                kind="engine",
                precision=p,
                batch_size=b,
                decoder=d,
                decode_threads=dt,
                ort_threads=ot,
                decode_workers=w,
            )
            for p in opts.precisions
            for b in opts.batch_sizes
            for d in opts.decoders
            for dt, ot in splits
            for w in opts.decode_workers
        ]
        out.append(ref)
        out += [c for c in sweep if replace(c, reference=True) != ref]
    return out


# --------------------------------------------------------------------------- parent


def run_bench(opts: BenchOptions) -> list[dict[str, Any]]:
    """Run every configuration; append one JSON line each to opts.results; return the lines."""
    from engine.models import init_models, load_models

    if opts.workdir is not None:
        work = Path(opts.workdir)
        work.mkdir(parents=True, exist_ok=True)
        cleanup = None
    else:
        cleanup = tempfile.TemporaryDirectory(prefix="cxr-bench-")
        work = Path(cleanup.name)
    try:
        models_dir = opts.models
        if models_dir is None:
            models_dir = work / "models"
            if not (models_dir / "classifier.json").is_file():
                _say(opts, f"exporting the full architectures (untrained) into {models_dir}")
                init_models(models_dir, size="full", seed=0)
        available: dict[str, str] = {}
        missing: dict[str, str] = {}
        for p in opts.precisions:
            try:
                available[p] = load_models(models_dir, precision=p).model_id
            except ModelError as exc:
                missing[p] = str(exc)
        inputs = _inputs(opts)
        dev = _spread(list_images(opts.dev_images), opts.quality_limit) if opts.quality else []
        series = uuid.uuid4().hex[:12]
        rounds: list[list[dict[str, Any]]] = []
        for r in range(opts.rounds):
            # a round is a run of its own: its id, its ratios (configurations side by side)
            run_id = series if opts.rounds == 1 else uuid.uuid4().hex[:12]
            base = header("screen", run_id)
            if opts.rounds > 1:
                base |= {"series": series, "round": r + 1, "rounds": opts.rounds}
            records: list[dict[str, Any]] = []
            # every run gets fresh output directories: `screen` would resume into old ones
            ctx = _Context(
                opts=opts, work=work / run_id, models=Path(models_dir), inputs=inputs, dev=dev
            )
            for cfg in plan(opts):
                if cfg.precision not in available:
                    reason = missing.get(cfg.precision)
                    rec = _record(base, ctx, cfg, status="skipped", reason=reason)
                else:
                    _say(opts, f"running {cfg.name}" + (f" (round {r + 1})" if r else ""))
                    result = _run_child(ctx, cfg)
                    rec = _record(base, ctx, cfg, result=result, model_id=available[cfg.precision])
                    _add_ratios_and_quality(rec, records, ctx)
                append_jsonl(opts.results, rec)
                records.append(rec)
            if not opts.quiet:
                print(format_table(records))
            rounds.append(records)
        if opts.rounds > 1 and not opts.quiet:
            print(format_rounds(rounds))
        return [rec for records in rounds for rec in records]
    finally:
        if cleanup is not None and not opts.keep:
            cleanup.cleanup()


@dataclass
class _Context:
    opts: BenchOptions
    work: Path
    models: Path
    inputs: list[str]
    dev: list[Path]
    outputs: dict[str, dict[str, str]] = field(default_factory=dict)  # config name -> out dirs


def _spread(items: list[Path], n: int | None) -> list[Path]:
    """n items evenly spread over the list (both classes of the sorted dev set), or all."""
    if n is None or n >= len(items):
        return items
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


def _say(opts: BenchOptions, text: str) -> None:
    if not opts.quiet:
        print(f"[bench] {text}", file=sys.stderr, flush=True)


def _inputs(opts: BenchOptions) -> list[str]:
    """The measured inputs as `screen` arguments: image files (limit applied) or one tar."""
    archive = Path(opts.archive) if opts.archive is not None else opts.dev_images
    if archive.is_file() and archive.suffix in (".tar", ".tgz", ".gz", ".zip"):
        if opts.limit is not None:
            raise ConfigError(
                "--limit needs a directory --archive (a tar is screened whole); "
                "use make_archive's tree, or leave out --limit"
            )
        return [str(archive.resolve())]
    files = [str(p.resolve()) for p in list_images(archive, opts.limit)]
    if not files:
        raise ConfigError(f"no images in {archive}")
    return files


def _run_child(ctx: _Context, cfg: Config) -> dict[str, Any]:
    spec_path = ctx.work / "specs" / f"{_slug(cfg.name)}.json"
    spec_path.parent.mkdir(parents=True, exist_ok=True)
    out_dir = ctx.work / "runs" / _slug(cfg.name)
    spec = {
        "config": asdict(cfg),
        "models": str(ctx.models),
        "inputs": ctx.inputs,
        "dev": [str(p) for p in ctx.dev] if cfg.kind == "engine" else [],
        "warmup_inputs": _warmup_inputs(ctx, cfg),
        "out": str(out_dir),
        "warmup": ctx.opts.warmup,
        "naive_limit": ctx.opts.naive_limit,
        "model_only_images": ctx.opts.model_only_images,
    }
    spec_path.write_text(json.dumps(spec))
    result_path = spec_path.with_suffix(".result.json")
    result_path.unlink(missing_ok=True)
    log = spec_path.with_suffix(".log")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    t = time.perf_counter()
    with open(log, "w") as logf:
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.bench_screen", "--worker", str(spec_path)],
            cwd=REPO,
            env=env,
            stdout=logf,
            stderr=subprocess.STDOUT,
        )
    if proc.returncode != 0 or not result_path.is_file():
        tail = log.read_text(errors="replace")[-2000:]
        return {"status": "failed", "reason": f"child exited {proc.returncode}: {tail}"}
    result = json.loads(result_path.read_text())
    result["child_wall_s"] = round(time.perf_counter() - t, 3)
    if cfg.kind in ("engine", "null"):
        ctx.outputs[cfg.name] = {"archive": str(out_dir / "run"), "dev": str(out_dir / "dev")}
    return result


def _warmup_inputs(ctx: _Context, cfg: Config) -> list[str]:
    """The first images (two batches unless --warmup), or dev images when screening a tar."""
    n = ctx.opts.warmup or max(8, 2 * cfg.batch_size)
    many = (
        ctx.inputs if len(ctx.inputs) > 1 else [str(p) for p in list_images(ctx.opts.dev_images, n)]
    )
    return (many or ctx.inputs)[:n]


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in name)


def _record(
    base: dict[str, Any],
    ctx: _Context,
    cfg: Config,
    *,
    result: dict[str, Any] | None = None,
    status: str = "ok",
    reason: str | None = None,
    model_id: str | None = None,
) -> dict[str, Any]:
    result = dict(result or {})
    status = result.pop("status", status)
    reason = result.pop("reason", reason)
    archive = ctx.opts.archive if ctx.opts.archive is not None else ctx.opts.dev_images
    rec = {
        **base,
        "timestamp": now_iso(),
        "config": {
            "name": cfg.name,
            **asdict(cfg),
            "backend": {"null": "null"}.get(cfg.kind, "onnxruntime"),
            "threads": ctx.opts.threads,
            "archive": str(archive),
            "inputs": len(ctx.inputs),
            "limit": ctx.opts.limit,
            "models": str(ctx.models),
            "model_id": model_id,
        },
        "status": status,
    }
    if reason:
        rec["reason"] = reason
    if result:
        rec["result"] = result
    return rec


def _add_ratios_and_quality(
    rec: dict[str, Any], earlier: list[dict[str, Any]], ctx: _Context
) -> None:
    if rec["status"] != "ok":
        return
    rate = rec["result"].get("images_per_s") or 0.0
    cfg = rec["config"]

    def best(kind: str) -> dict[str, Any] | None:
        done = [r for r in earlier if r["config"]["kind"] == kind and r["status"] == "ok"]
        return max(done, key=lambda r: r["result"]["images_per_s"], default=None)

    ratios: dict[str, Any] = {}
    for key, kind in (("vs_naive", "naive"), ("vs_model_only", "model-only"), ("vs_null", "null")):
        other = best(kind)
        if other is not None and other is not rec and other["result"]["images_per_s"] > 0:
            ratios[key] = float(f"{rate / other['result']['images_per_s']:.6g}")
            ratios[key.replace("vs_", "") + "_config"] = other["config"]["name"]
    same = next(
        (
            r
            for r in earlier
            if r["config"]["kind"] == "model-only"
            and r["status"] == "ok"
            and r["config"]["precision"] == cfg["precision"]
            and r["config"]["batch_size"] == cfg["batch_size"]
        ),
        None,
    )
    if same is not None and cfg["kind"] == "engine":
        ratios["vs_model_only_same"] = float(f"{rate / same['result']['images_per_s']:.6g}")
    if cfg["kind"] in ("engine", "null") and ratios:
        rec["ratios"] = ratios
    if cfg["kind"] == "engine" and ctx.opts.quality:
        rec["quality"] = _quality(rec, earlier, ctx)


def _quality(rec: dict[str, Any], earlier: list[dict[str, Any]], ctx: _Context) -> dict[str, Any]:
    from benchmarks import quality

    ref = next(
        (r for r in earlier if r["config"]["kind"] == "engine" and r["config"]["reference"]), None
    )
    if rec["config"]["reference"]:
        return {"reference": rec["config"]["name"], "note": "this is the reference"}
    if ref is None or ref["status"] != "ok":
        return {"note": "no reference run to compare with"}
    mine = ctx.outputs.get(rec["config"]["name"], {})
    theirs = ctx.outputs.get(ref["config"]["name"], {})
    out: dict[str, Any] = {"reference": ref["config"]["name"]}
    labels = (
        quality.read_labels(ctx.opts.labels)
        if ctx.opts.labels and Path(ctx.opts.labels).is_file()
        else None
    )
    for part, lab in (("archive", None), ("dev", labels)):
        a, b = theirs.get(part), mine.get(part)
        if a and b and (Path(a) / "predictions").is_dir() and (Path(b) / "predictions").is_dir():
            out[part] = quality.agreement(quality.read_run(Path(a)), quality.read_run(Path(b)), lab)
    return out


def format_table(records: list[dict[str, Any]]) -> str:
    head = (
        f"{'configuration':42s} {'img/s':>8s} {'x naive':>8s} {'x model':>8s} "
        f"{'p50 ms':>8s} {'p99 ms':>8s} {'RSS MiB':>8s} {'CPU %':>6s} {'same dec':>8s}"
    )
    lines = [head, "-" * len(head)]
    for r in records:
        name = r["config"]["name"]
        if r["status"] != "ok":
            lines.append(f"{name:42s} {r['status']}: {str(r.get('reason', ''))[:80]}")
            continue
        res, ratios = r["result"], r.get("ratios", {})
        lat = res.get("batch_latency_ms") or {}
        q = r.get("quality", {})
        same = (q.get("dev") or q.get("archive") or {}).get("same_decision")
        lines.append(
            f"{name:42s} {res['images_per_s']:8.2f} {_fmt(ratios.get('vs_naive'))} "
            f"{_fmt(ratios.get('vs_model_only'))} {_fmt(lat.get('p50'), 1)} "
            f"{_fmt(lat.get('p99'), 1)} {_fmt(res.get('peak_rss_mib'), 0)} "
            f"{100 * res.get('cpu_utilisation', 0):6.0f} {_fmt(same, 4)}"
        )
    return "\n".join(lines)


def round_medians(rounds: list[list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per configuration over the rounds: img/s and each ratio as median, min, max."""
    values: dict[str, dict[str, list[float]]] = {}
    for records in rounds:
        for r in records:
            if r["status"] != "ok":
                continue
            row = values.setdefault(r["config"]["name"], {})
            row.setdefault("images_per_s", []).append(r["result"]["images_per_s"])
            for key in ("vs_naive", "vs_model_only", "vs_null"):
                if key in r.get("ratios", {}):
                    row.setdefault(key, []).append(r["ratios"][key])
    return {
        name: {
            key: {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}
            for key, v in row.items()
        }
        for name, row in values.items()
    }


def format_rounds(rounds: list[list[dict[str, Any]]]) -> str:
    """The medians over the rounds (min-max), a line per configuration."""
    lines = [f"over {len(rounds)} rounds: median (min-max)"]
    for name, row in round_medians(rounds).items():
        cells = [
            f"{key.replace('images_per_s', 'img/s').replace('vs_', 'x ')} "
            f"{v['median']:.2f} ({v['min']:.2f}-{v['max']:.2f})"
            for key, v in row.items()
        ]
        lines.append(f"{name:42s} " + "; ".join(cells))
    return "\n".join(lines)


def _fmt(x: float | None, digits: int = 2) -> str:
    return f"{x:8.{digits}f}" if isinstance(x, int | float) else f"{'-':>8s}"


# --------------------------------------------------------------------------- command line


def split_ints(text: str, option: str = "--batch-size") -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"{option} takes a comma list of integers, not {text!r}") from None


def split_words(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def parse_splits(text: str) -> tuple[tuple[int, int], ...]:
    """ "2:2,1:2" -> ((2, 2), (1, 2)): decode threads : ONNX Runtime threads."""
    splits = []
    for part in split_words(text):
        a, sep, b = part.partition(":")
        if not sep or not a.isdigit() or not b.isdigit():
            raise ConfigError(f"--thread-split wants DECODE:ORT pairs like 1:2, not {part!r}")
        splits.append((int(a), int(b)))
    return tuple(splits)


def options_from_args(argv: list[str] | None = None) -> BenchOptions:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--archive", type=Path, help="images to screen (tree or .tar); default: dev set")
    p.add_argument("--models", type=Path, help="models dir (default: full untrained, exported)")
    p.add_argument("--precision", default="fp32,int8")
    p.add_argument("--batch-size", default="16")
    p.add_argument("--threads", type=int, default=cores())
    p.add_argument("--thread-split", default="", help="DECODE:ORT thread pairs, e.g. 1:2,2:2")
    p.add_argument("--decoder", default="dali", help="auto,dali,pillow,pillow-draft,pillow-draftK")
    p.add_argument(
        "--decode-workers", default="0", help="reading/decoding threads, e.g. 1,0 (0: threads)"
    )
    p.add_argument("--limit", type=int, help="screen only the first N images of --archive")
    p.add_argument("--naive-limit", type=int, default=100, help="images for the naive baseline")
    p.add_argument("--warmup", type=int, help="warm-up images per configuration (2 batches)")
    p.add_argument("--configs", default=",".join(KINDS), help=",".join(KINDS))
    p.add_argument("--model-only-images", type=int, default=64)
    p.add_argument("--no-quality", action="store_true", help="skip the agreement checks")
    p.add_argument("--quality-limit", type=int, help="dev images per configuration (all: 288)")
    p.add_argument("--dev-images", type=Path, default=default_data_dir() / "images")
    p.add_argument("--labels", type=Path, default=default_data_dir() / "labels.csv")
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    p.add_argument("--workdir", type=Path, help="keep outputs here (default: temporary)")
    p.add_argument("--keep", action="store_true", help="keep the temporary work directory")
    p.add_argument("--quiet", action="store_true")
    p.add_argument(
        "--rounds", type=int, default=1, help="run every configuration N times, interleaved"
    )
    a = p.parse_args(argv)
    return BenchOptions(
        archive=a.archive,
        models=a.models,
        precisions=split_words(a.precision),
        batch_sizes=split_ints(a.batch_size),
        threads=a.threads,
        thread_splits=parse_splits(a.thread_split),
        decoders=split_words(a.decoder),
        decode_workers=split_ints(a.decode_workers, "--decode-workers"),
        limit=a.limit,
        naive_limit=a.naive_limit,
        warmup=a.warmup,
        configs=split_words(a.configs),
        model_only_images=a.model_only_images,
        quality=not a.no_quality,
        quality_limit=a.quality_limit,
        dev_images=a.dev_images,
        labels=a.labels,
        results=a.results,
        workdir=a.workdir,
        keep=a.keep,
        quiet=a.quiet,
        rounds=a.rounds,
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        worker(Path(argv[1]))
        return 0
    try:
        run_bench(options_from_args(argv))
    except (ConfigError, ModelError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
