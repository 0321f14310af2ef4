"""`cxr screen --ray`: the same screening run, its shards screened by Ray Data actor pools.

The driver (this process), under the output lock for the whole cluster run:

1. does what the single-process runner does before screening (model check, leftovers of a
   killed run removed, committed sidecars merged, keys already written skipped) and writes
   run.json with a new run_id first: workers check it before every commit (`shard.fence`);
2. connects to Ray and has every node check that it sees --out (this run's run.json) and the
   inputs: a node on another filesystem fails the run at once, naming the node and the path;
3. lists the inputs once, without reading image bytes (engine/io/shards.py), and cuts them into
   shards numbered after every part an earlier run committed or planned, so that no part name
   is ever reused by a different shard;
4. runs `ray.data.from_items(shards).map_batches(ShardActor, batch_size=1)` on an actor pool:
   on CPU nodes ONNX Runtime actors of `--ray-actor-cpus` CPUs (default: a node's cores), on GPU
   nodes one actor per GPU (num_gpus=1; the engine's TensorRT + DALI path). Ray Data restarts
   dead actors and retries their shards; a retried shard finds its part and is not redone;
5. folds each shard's result into the progress bar, the counts and per-node figures, then
   merges the sidecars into index.usearch and writes run.json with the cluster's description.

Model files go to the workers once through the object store, with their manifests; each
worker writes them to a local cache and loads them with the usual sha256 check, and refuses
to run models whose id differs from the driver's (the worker side: engine/distributed/worker.py).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from engine.config import ScreenConfig
from engine.distributed.worker import ShardActor, WorkerSpec, model_files
from engine.errors import ConfigError, EngineError
from engine.io import parquet
from engine.io.archive import ArchiveStats
from engine.io.outdir import OutputLock, read_run_json, write_run_json
from engine.io.resume import check_resumable, remove_leftovers, resume
from engine.io.shards import Shard, list_entries, plan_shards
from engine.models import ModelSet, load_models
from engine.run_record import ERROR_SAMPLES, RunSummary, run_record
from engine.screener import embedding_dim

RAY_EXTRA_HINT = "install the ray extra: pip install 'cxr-engine[ray]'"
PREFLIGHT_TIMEOUT_S = 120.0
# A rerun after a killed cluster run waits this long after taking over run.json before it
# lists what is committed: a worker of the dead run that had passed its fence just before
# finishes its commit within it (a part is one rename after its writes).
FENCE_GRACE_S = 3.0
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:/")

ProgressFn = Callable[..., None]  # (images, errors=...) per finished shard


@dataclass(frozen=True)
class NodeInfo:
    node_id: str
    host: str
    address: str
    cpus: float
    gpus: float


@dataclass(frozen=True)
class ActorPlan:
    count: int
    cpus: int
    gpus: int
    kind: str  # "cpu" | "gpu"


@dataclass
class NodeFigures:
    host: str
    images: int = 0
    shards: int = 0
    busy_s: float = 0.0
    first_start: float = float("inf")
    last_end: float = 0.0

    def to_json(self, node_id: str) -> dict[str, Any]:
        wall = max(0.0, self.last_end - self.first_start) if self.shards else 0.0
        return {
            "node_id": node_id,
            "host": self.host,
            "images": self.images,
            "shards": self.shards,
            "busy_s": round(self.busy_s, 3),
            "wall_s": round(wall, 3),
            "images_per_s": round(self.images / wall, 3) if wall > 0 else 0.0,
        }


@dataclass
class _Fold:
    """What the driver keeps of the shard results."""

    backends: set[str] = field(default_factory=set)
    decoders: set[str] = field(default_factory=set)
    nodes: dict[str, NodeFigures] = field(default_factory=dict)
    stage_s: dict[str, float] = field(default_factory=dict)
    latencies_s: list[float] = field(default_factory=list)
    shards_done: int = 0
    shards_found_committed: int = 0


# ---------------------------------------------------------------------------------------------
# the driver


def screen(config: ScreenConfig, *, on_progress: ProgressFn | None = None) -> RunSummary:
    """Screen config.inputs into config.out on a Ray cluster; resumable, exactly once."""
    _refuse_nightly_options(config)
    ray = _import_ray()
    _refuse_urls(config)
    models = load_models(config.models, precision=config.precision).with_threshold(config.threshold)
    out = Path(os.path.abspath(config.out))  # workers have other working directories
    with OutputLock(out):
        previous = read_run_json(out)
        check_resumable(
            out,
            previous=previous,
            model_id=models.model_id,
            dim=embedding_dim(models),
            threshold=models.classifier.threshold,
            with_embeddings=config.embeddings_in_parquet,
        )
        summary = RunSummary(
            run_id=uuid.uuid4().hex[:12],
            out=Path(config.out),
            backend=config.backend,
            decoder=config.decoder,
            model_id=models.model_id,
            trained=models.trained,
            precision_why=models.precision_why,
        )
        started = datetime.now(UTC)
        cluster: dict[str, Any] = {"ray_version": ray.__version__}

        def record(status: str) -> None:
            data = run_record(config, models, summary, previous, started, status)
            data["cluster"] = cluster
            data["libraries"]["ray"] = ray.__version__
            write_run_json(out, data)

        record("running")  # from here on, workers of an earlier run cannot commit (fence)
        try:
            _run_locked(ray, config, models, out, previous, summary, cluster, record, on_progress)
        except EngineError:
            record("failed")
            raise
    return summary


def _run_locked(
    ray: Any,
    config: ScreenConfig,
    models: ModelSet,
    out: Path,
    previous: dict[str, Any] | None,
    summary: RunSummary,
    cluster: dict[str, Any],
    record: Callable[[str], None],
    on_progress: ProgressFn | None,
) -> None:
    if _unfinished_cluster_run(previous):
        time.sleep(FENCE_GRACE_S)
    dim = embedding_dim(models)
    done = resume(out, dim)  # finish what a killed run committed
    with _connected(ray, config) as nodes:
        plan = plan_actors(nodes, config)
        cluster.update(_describe(ray, nodes, plan, config))
        check_nodes(ray, nodes, out, summary.run_id, visible_inputs(config))
        stats = ArchiveStats()
        entries = list(list_entries(config.inputs, skip=done.__contains__, stats=stats))
        summary.ignored_files, summary.skipped_existing = stats.ignored, stats.skipped
        first = _first_part_number(out, previous)
        shards = plan_shards(entries, config.shard_size, first)
        cluster["parts"] = {"first": first, "end": first + len(shards), "shards": len(shards)}
        cluster["images_planned"] = len(entries)
        record("running")
        fold = _Fold()
        t0 = time.perf_counter()
        try:
            if shards:
                _execute(ray, config, models, out, summary, shards, plan, fold, on_progress)
        except KeyboardInterrupt:
            summary.interrupted = True
        finally:
            summary.wall_s = time.perf_counter() - t0
            _finish_summary(summary, fold, cluster)
    remove_leftovers(out)  # what workers on dead nodes left (their shards were redone elsewhere)
    summary.count_output(out, dim)
    record("interrupted" if summary.interrupted else "complete")


def _refuse_nightly_options(config: ScreenConfig) -> None:
    """The nightly checks (engine/nightly) run in the single-process runner only so far."""
    asked = [
        name
        for name, on in (
            ("--rescreen-changed", config.rescreen_changed),
            ("--reference", config.reference is not None),
            ("--fail-on-drift", config.fail_on_drift),
        )
        if on
    ]
    if asked:
        raise ConfigError(
            f"{', '.join(asked)}: not available with --ray yet (the changed-file and drift "
            "checks run in the single-process engine); run without --ray for these"
        )


def _import_ray() -> Any:
    # No usage reports leave this process (Ray's telemetry; Ray Data's also queries a metrics
    # server that is not there, with tracebacks on stderr when a run fails), unless the user
    # asked for them.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DATA_USAGE_DISABLED", "1")
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise ConfigError(f"--ray needs Ray Data: {RAY_EXTRA_HINT}") from None
    return ray


def visible_inputs(config: ScreenConfig) -> list[str]:
    """The inputs the driver sees (absolute): each worker must see them too. (One the driver
    does not see is an error row, as in a local run.)"""
    return [os.path.abspath(p) for p in config.inputs if os.path.exists(p)]


def _refuse_urls(config: ScreenConfig) -> None:
    for path in (config.out, *config.inputs):
        # pathlib folds "s3://b/k" into "s3:/b/k"
        if _URL.match(str(path)):
            raise ConfigError(
                f"{path}: object storage URLs are not supported; --out and the inputs must be "
                "paths on a filesystem every node mounts at the same place (NFS, Lustre, "
                "CephFS, a FUSE mount of the bucket)"
            )


def _unfinished_cluster_run(previous: dict[str, Any] | None) -> bool:
    """A cluster run that did not complete: some of its workers may still be finishing."""
    return bool(previous and previous.get("cluster") and previous.get("status") != "complete")


def _first_part_number(out: Path, previous: dict[str, Any] | None) -> int:
    """After every committed part and every part the previous cluster run planned."""
    planned = ((previous or {}).get("cluster") or {}).get("parts") or {}
    return max(parquet.next_part_number(out), int(planned.get("end", 0)))


@contextmanager
def _connected(ray: Any, config: ScreenConfig) -> Iterator[list[NodeInfo]]:
    """Connect (unless this process already is connected) and yield the alive nodes."""
    address = (config.ray or "auto").strip()
    started_here = not ray.is_initialized()
    if started_here:
        kwargs: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
        try:
            if address == "local":  # a new instance here, even where RAY_ADDRESS is set
                ray.init(
                    address="local", num_cpus=config.threads, include_dashboard=False, **kwargs
                )
            else:
                if address == "auto":
                    address = os.environ.get("RAY_ADDRESS") or "auto"
                ray.init(address=address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ConfigError(
                f"--ray {config.ray}: cannot connect to a Ray cluster ({exc}). Start one with "
                "`ray start --head`, set RAY_ADDRESS, or try `--ray local`"
            ) from None
    try:
        yield alive_nodes(ray)
    finally:
        if started_here:
            ray.shutdown()


def alive_nodes(ray: Any) -> list[NodeInfo]:
    nodes = []
    for n in ray.nodes():
        if not n.get("Alive"):
            continue
        res = n.get("Resources", {})
        nodes.append(
            NodeInfo(
                node_id=n["NodeID"],
                host=n.get("NodeManagerHostname", ""),
                address=n.get("NodeManagerAddress", ""),
                cpus=float(res.get("CPU", 0.0)),
                gpus=float(res.get("GPU", 0.0)),
            )
        )
    return nodes


def plan_actors(nodes: list[NodeInfo], config: ScreenConfig) -> ActorPlan:
    """One actor per GPU where there are GPUs (and the backend may use them), else ONNX
    Runtime actors of `ray_actor_cpus` CPUs (default: the smallest CPU node's cores)."""
    gpu_nodes = [n for n in nodes if n.gpus >= 1]
    if gpu_nodes and config.backend in ("auto", "tensorrt"):
        per_gpu = min(int(n.cpus // n.gpus) for n in gpu_nodes)
        cpus = config.ray_actor_cpus or max(1, per_gpu)
        return ActorPlan(count=int(sum(n.gpus for n in gpu_nodes)), cpus=cpus, gpus=1, kind="gpu")
    cpu_nodes = [n for n in nodes if n.cpus >= 1]
    if not cpu_nodes:
        raise ConfigError("the Ray cluster has no node with a CPU to screen on")
    cpus = config.ray_actor_cpus or min(int(n.cpus) for n in cpu_nodes)
    count = sum(int(n.cpus) // cpus for n in cpu_nodes)
    if count == 0:
        biggest = max(int(n.cpus) for n in cpu_nodes)
        raise ConfigError(
            f"--ray-actor-cpus {cpus}: no node of the cluster has that many CPUs "
            f"(the biggest has {biggest})"
        )
    return ActorPlan(count=count, cpus=cpus, gpus=0, kind="cpu")


def _describe(ray: Any, nodes: list[NodeInfo], plan: ActorPlan, config: ScreenConfig) -> dict:
    return {
        "ray_version": ray.__version__,
        "address": config.ray,
        "nodes": [
            {
                "node_id": n.node_id,
                "host": n.host,
                "address": n.address,
                "cpus": n.cpus,
                "gpus": n.gpus,
            }
            for n in nodes
        ],
        "cpus": sum(n.cpus for n in nodes),
        "gpus": sum(n.gpus for n in nodes),
        "actors": {"kind": plan.kind, "count": plan.count, "cpus": plan.cpus, "gpus": plan.gpus},
    }


def check_nodes(ray: Any, nodes: list[NodeInfo], out: Path, run_id: str, inputs: list[str]) -> None:
    """Every alive node must see --out (this run's run.json) and `inputs`."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from engine.distributed.shard import check_view

    probe = ray.remote(num_cpus=0, max_retries=0)(check_view)
    refs = {
        probe.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n.node_id, soft=False)
        ).remote(out, run_id, inputs): n
        for n in nodes
    }
    ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=PREFLIGHT_TIMEOUT_S)
    problems = []
    for ref in ready:
        node = refs[ref]
        try:
            found = ray.get(ref)
        except Exception as exc:  # noqa: BLE001 - a node that cannot run the check is a problem
            found = [f"the check failed: {exc}"]
        problems += [f"node {node.address} ({node.host}): {p}" for p in found]
    for ref in pending:
        node = refs[ref]
        problems.append(
            f"node {node.address} ({node.host}): did not answer within {PREFLIGHT_TIMEOUT_S:.0f} s"
        )
    if problems:
        raise EngineError(
            "every Ray node must see --out and the inputs at the same paths (a shared "
            "filesystem), and this one does not: " + "; ".join(problems)
        )


def _execute(
    ray: Any,
    config: ScreenConfig,
    models: ModelSet,
    out: Path,
    summary: RunSummary,
    shards: list[Shard],
    plan: ActorPlan,
    fold: _Fold,
    on_progress: ProgressFn | None,
) -> None:
    import importlib

    ray_data = importlib.import_module("ray.data")  # the parameter `ray` stays the module

    ctx = ray_data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the driver's own bar counts images for the whole cluster
    ctx.print_on_execution_start = False
    ctx.raise_original_map_exception = True  # a worker's EngineError reaches us as itself
    # ... and says so; the pool is sized to the cluster from the start, so the autoscaler's
    # note that it cannot grow it further is no news either
    for name in ("ray.data._internal.progress", "ray.data._internal.actor_autoscaler"):
        logging.getLogger(name).setLevel(logging.ERROR)
    actor_config = replace(config, threads=plan.cpus, out=out)
    summary.decode_workers = actor_config.workers  # in each actor
    spec = WorkerSpec(
        config=actor_config,
        model_id=models.model_id,
        run_id=summary.run_id,
        inputs=visible_inputs(config),
    )
    files = ray.put(model_files(models))
    rows = [{"number": s.number, "entries": s.to_json()} for s in shards]
    ds = ray_data.from_items(rows, override_num_blocks=len(rows))
    ds = ds.map_batches(
        ShardActor,
        batch_size=1,
        compute=ray_data.ActorPoolStrategy(
            min_size=1,
            max_size=plan.count,
            initial_size=plan.count,
            max_tasks_in_flight_per_actor=1,
        ),
        num_cpus=plan.cpus,
        num_gpus=plan.gpus or None,
        fn_constructor_kwargs={"spec": spec, "files": [files]},
    )
    try:
        for row in ds.iter_rows():
            _fold_row(row, summary, fold, on_progress)
    except KeyboardInterrupt:
        raise
    except EngineError:
        raise
    except Exception as exc:  # noqa: BLE001 - Ray wraps the worker's error; unwrap ours
        raise _unwrap(exc) from None


def _fold_row(
    row: dict[str, Any], summary: RunSummary, fold: _Fold, on_progress: ProgressFn | None
) -> None:
    n, errors = int(row["rows"]), int(row["errors"])
    summary.processed += n
    summary.ok += int(row["ok"])
    summary.errors += errors
    summary.positives += int(row["positives"])
    room = ERROR_SAMPLES - len(summary.error_samples)
    if room > 0:
        summary.error_samples += json.loads(row["error_samples"])[:room]
    fold.shards_done += 1
    fold.shards_found_committed += bool(row["already_committed"])
    fold.backends.add(str(row["backend"]))
    fold.decoders.add(str(row["decoder"]))
    node = fold.nodes.setdefault(str(row["node_id"]), NodeFigures(host=str(row["host"])))
    node.images += n
    node.shards += 1
    node.busy_s += float(row["seconds"])
    node.first_start = min(node.first_start, float(row["started"]))
    node.last_end = max(node.last_end, float(row["started"]) + float(row["seconds"]))
    for stage, s in json.loads(row["stage_s"]).items():
        fold.stage_s[stage] = fold.stage_s.get(stage, 0.0) + s
    fold.latencies_s += json.loads(row["latencies_s"])
    if on_progress is not None:
        on_progress(n, errors=errors)


def _finish_summary(summary: RunSummary, fold: _Fold, cluster: dict[str, Any]) -> None:
    if fold.backends:
        summary.backend = ",".join(sorted(fold.backends))
        summary.decoder = ",".join(sorted(fold.decoders))
    summary.stage_s = dict(fold.stage_s)
    summary.set_latencies(fold.latencies_s)
    cluster["shards_done"] = fold.shards_done
    cluster["shards_found_committed"] = fold.shards_found_committed
    cluster["per_node"] = [f.to_json(node_id) for node_id, f in sorted(fold.nodes.items())]


def _unwrap(exc: BaseException) -> EngineError:
    """The EngineError a worker raised, out of Ray's wrappers; else one that says what failed.

    A map error comes back as the original exception (raise_original_map_exception) with Ray
    Data's retry advice appended; an actor that failed to start comes back as ActorDiedError
    whose text holds the constructor's traceback, whose last engine error line is ours.
    """
    chain: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and e not in chain:
        chain.append(e)
        e = getattr(e, "cause", None) or e.__cause__ or e.__context__
    for e in chain:
        if isinstance(e, EngineError):
            cls = next(c for c in type(e).__mro__ if c.__module__.startswith("engine."))
            return cls(_own_message(str(e.args[0]) if e.args else str(e)))
    text = "\n".join([*(str(e) for e in chain), *(str(a) for e in chain for a in e.args)])
    found = _ENGINE_ERROR_LINE.findall(text)
    if found:
        module, name, message = found[-1]
        cls = getattr(importlib.import_module(module), name, EngineError)
        if not (isinstance(cls, type) and issubclass(cls, EngineError)):
            cls = EngineError
        return cls(_own_message(message))
    lines = str(exc).strip().splitlines()
    return EngineError(f"the Ray run failed: {lines[-1] if lines else type(exc).__name__}")


_ENGINE_ERROR_LINE = re.compile(r"^(engine(?:\.\w+)*)\.(\w+): (.+)$", re.M)


def _own_message(message: str) -> str:
    return message.split("\nFailed to apply UDF transform", 1)[0].strip()
