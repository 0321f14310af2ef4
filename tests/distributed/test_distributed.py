"""`cxr screen --ray` on a local Ray cluster: three simulated nodes of one CPU on this machine.

The same inputs (real CXRs as files, in an uncompressed tar, a .tar.gz and a zip, plus bad
inputs) screened by the single-process engine and on the cluster must give the same rows and
the same index; a node killed mid-run and a driver killed with SIGKILL must still end with
every image exactly once; a node that does not see the run's paths fails the run at once.

Skipped when Ray is not installed (`pip install -e '.[ray]'`).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from conftest import DATA, REPO, cxr_argv, dev_images, run_cli

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

from ray.cluster_utils import Cluster  # noqa: E402

from engine.config import ScreenConfig  # noqa: E402
from engine.errors import EngineError  # noqa: E402
from engine.io import parquet, vectors  # noqa: E402
from engine.io.archive import iter_items  # noqa: E402
from engine.runner import screen  # noqa: E402

STORE = 100 * 1024**2  # object store per simulated node (Ray's minimum is 75 MiB)
SHARD, BATCH = 4, 4
WAIT_S = 120.0


@pytest.fixture(scope="module", autouse=True)
def ray_files_under_tmp(tmp_path_factory):
    """Ray's session files and the workers' model cache (of the fixture's nodes and of child
    `cxr` processes) go under the test's tmp dir, not /tmp/ray and $TMPDIR."""
    chosen = {
        "RAY_TMPDIR": str(tmp_path_factory.mktemp("ray")),  # short: Ray puts sockets in it
        "CXR_MODEL_CACHE": str(tmp_path_factory.mktemp("model-cache")),
    }
    before = {k: os.environ.get(k) for k in chosen}
    os.environ.update(chosen)
    yield
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def cluster(ray_files_under_tmp):
    """Head + two workers, one CPU each; this process is connected to it as a driver.

    The nodes' worker processes import this checkout's engine whatever a driver's working
    directory (Ray puts the driver's on their path; an installed `cxr` may run elsewhere).
    """
    path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), path) if p)
    c = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "object_store_memory": STORE, "include_dashboard": False},
    )
    for _ in range(2):
        c.add_node(num_cpus=1, object_store_memory=STORE)
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()
        if path is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> list[str]:
    """36 real CXRs (24 named files, 4 in each archive) and 4 bad inputs."""
    images = dev_images(36)
    root = tmp_path_factory.mktemp("ray-inputs")

    def pack(kind: str, paths: list[Path]) -> str:
        path = root / f"pack.{kind}"
        if kind == "zip":
            with zipfile.ZipFile(path, "w") as z:
                for p in paths:
                    z.write(p, f"imgs/{p.name}")
        else:
            with tarfile.open(path, "w:gz" if kind == "tar.gz" else "w") as t:
                for p in paths:
                    t.add(p, f"imgs/{p.name}")
        return str(path)

    (root / "notes.png").write_text("not an image")
    (root / "cut.png").write_bytes(images[0].read_bytes()[:300])
    with tarfile.open(root / "odd.tar", "w") as t:
        info = tarfile.TarInfo("link.png")
        info.type, info.linkname = tarfile.SYMTYPE, "elsewhere.png"
        t.addfile(info)
        data = images[1].read_bytes()
        info = tarfile.TarInfo("ok.png")
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
    return [
        *(str(p) for p in images[:24]),  # real paths: `cxr evaluate` finds their labels
        pack("tar", images[24:28]),
        pack("tar.gz", images[28:32]),
        pack("zip", images[32:36]),
        str(root / "notes.png"),
        str(root / "cut.png"),
        str(root / "odd.tar"),
        str(root / "missing.png"),
    ]


def config(inputs, out: Path, models: Path, **kw) -> ScreenConfig:
    base = {"shard_size": SHARD, "batch_size": BATCH, "threads": 1, "progress": False}
    return ScreenConfig(
        inputs=tuple(Path(p) for p in inputs), out=out, models=models, **{**base, **kw}
    )


def rows(out: Path) -> pl.DataFrame:
    return parquet.read_predictions(out).sort("key")


def expected_keys(inputs) -> list[int]:
    return sorted(i.ref.key for i in iter_items(inputs))


def assert_exactly_once(out: Path, inputs) -> pl.DataFrame:
    df = rows(out)
    keys = df["key"].to_list()
    assert len(keys) == len(set(keys)), "a key is in two rows"
    assert keys == expected_keys(inputs)
    index = vectors.load_index(out)
    assert index is not None and len(index) == int((df["status"] == "ok").sum())
    ok_keys = df.filter(pl.col("status") == "ok")["key"].to_numpy()
    assert np.asarray(index.contains(ok_keys)).all()
    emb = out / "embeddings"
    # pending sidecars (embeddings/) and merged ones kept to rebuild the index (indexed/)
    sidecars = [p for d in (emb, emb / "indexed") if d.is_dir() for p in d.iterdir() if p.is_file()]
    committed = {f"part-{n:05d}.npz" for n, _ in parquet.list_parts(out)}
    assert {p.name for p in sidecars} <= committed, "sidecars of no part, or half-written ones"
    assert not [p for p in (out / "predictions").iterdir() if p.name.startswith(".")]
    thumbs = pl.read_parquet(out / "thumbs" / "*.parquet")
    assert sorted(thumbs["key"].to_list()) == sorted(ok_keys.tolist())
    return df


def leaves(tree, prefix: str = "") -> dict:
    """A nested JSON object as {"a.b.c": leaf}."""
    if isinstance(tree, dict | list):
        found: dict = {}
        items = tree.items() if isinstance(tree, dict) else enumerate(tree)
        for k, v in items:
            found.update(leaves(v, f"{prefix}{k}."))
        return found
    return {prefix.rstrip("."): tree}


def parts_count(out: Path) -> int:
    return len(parquet.list_parts(out))


def wait_for(condition, what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


# ---------------------------------------------------------------------------------------------


def test_ray_run_equals_local_run(cluster, inputs, tiny_models_dir, tmp_path):
    local = screen(config(inputs, tmp_path / "local", tiny_models_dir))
    on_ray = screen(config(inputs, tmp_path / "ray", tiny_models_dir, ray=cluster.address))

    a, b = rows(tmp_path / "local"), rows(tmp_path / "ray")
    assert a["key"].to_list() == b["key"].to_list() == expected_keys(inputs)
    for col in ("source", "member", "status", "error", "decision", "sha256", "width", "height"):
        assert a[col].to_list() == b[col].to_list(), col
    ok = a["status"] == "ok"
    assert np.abs(a.filter(ok)["prob"].to_numpy() - b.filter(ok)["prob"].to_numpy()).max() <= 1e-5
    assert a["lung_bbox"].to_list() == b["lung_bbox"].to_list()
    assert int((~ok).sum()) == 4  # notes, cut, missing, the tar's symlink
    errors = " ".join(b.filter(~ok)["error"].to_list())
    for needle in ("notes.png", "cut.png", "missing.png", "symlink refused"):
        assert needle in errors

    for s in (local, on_ray):
        assert (s.processed, s.total_rows, s.ok) == (len(a), len(a), int(ok.sum()))
    assert on_ray.index_size == local.index_size == int(ok.sum())
    assert_exactly_once(tmp_path / "ray", inputs)
    # the same layout: parts, thumbnails, index, run.json
    for sub in ("predictions", "thumbs"):
        assert sorted(p.name for p in (tmp_path / "ray" / sub).iterdir()) == sorted(
            p.name for p in (tmp_path / "local" / sub).iterdir()
        )
    record = json.loads((tmp_path / "ray" / "run.json").read_text())
    assert record["status"] == "complete"
    c = record["cluster"]
    assert c["ray_version"] == ray.__version__ and record["libraries"]["ray"] == ray.__version__
    assert len(c["nodes"]) == 3 and c["cpus"] == 3 and c["gpus"] == 0
    assert c["actors"] == {"kind": "cpu", "count": 3, "cpus": 1, "gpus": 0}
    assert sum(n["images"] for n in c["per_node"]) == len(b)
    assert all(n["images_per_s"] > 0 for n in c["per_node"])
    assert {n["node_id"] for n in c["per_node"]} <= {n["node_id"] for n in c["nodes"]}

    # what reads a run works on it unchanged: similar, evaluate
    key = str(b.filter(ok)["key"][0])
    found = []
    for out in ("local", "ray"):
        code, stdout, stderr = run_cli(["similar", key, "--out", tmp_path / out, "--json"])
        assert code == 0, stderr
        found.append(
            [(n["key"], round(n["similarity"], 4)) for n in json.loads(stdout)["neighbours"]]
        )
    assert found[0] == found[1] and len(found[1]) == 10
    labels = DATA / "cxr-dev" / "labels.csv"
    scores = []
    for out in ("local", "ray"):
        code, stdout, stderr = run_cli(
            ["evaluate", tmp_path / out, "--labels", labels, "--bootstrap", "0", "--json"]
        )
        assert code == 0, stderr
        scores.append(json.loads(stdout)["overall"])
    assert leaves(scores[0]).keys() == leaves(scores[1]).keys()
    for name, value in leaves(scores[0]).items():
        assert leaves(scores[1])[name] == pytest.approx(value, abs=1e-5), name

    # the review page's store: the same rows and the same previews
    from engine.serve.store import RunStore

    stores = [RunStore(tmp_path / out) for out in ("local", "ray")]
    assert stores[1].run_info() and stores[1].summary()
    for k in b.filter(ok)["key"].to_list()[:5]:
        assert stores[0].previews(k) == stores[1].previews(k) is not None
        assert stores[0].row(k)["prob"] == pytest.approx(stores[1].row(k)["prob"], abs=1e-5)

    # a rerun finds everything done and screens nothing
    again = screen(config(inputs, tmp_path / "ray", tiny_models_dir, ray=cluster.address))
    assert (again.processed, again.skipped_existing, again.total_rows) == (0, len(b), len(b))


def test_a_node_that_does_not_see_the_paths_fails_the_run_at_once(cluster, tmp_path):
    from engine.distributed.executor import alive_nodes, check_nodes
    from engine.io.outdir import write_run_json

    out = tmp_path / "out"
    out.mkdir()
    write_run_json(out, {"run_id": "abc"})
    check_nodes(ray, alive_nodes(ray), out, "abc", [str(out)])  # all well: no error
    with pytest.raises(EngineError) as err:
        check_nodes(ray, alive_nodes(ray), out, "other", ["/nowhere/archive"])
    message = str(err.value)
    assert "shared filesystem" in message
    assert message.count("/nowhere/archive: no such file or directory") == 3  # every node
    assert "its run.json is run abc's, not this run's (other)" in message


def test_killing_a_node_mid_run_still_ends_exactly_once(cluster, inputs, tiny_models_dir, tmp_path):
    out = tmp_path / "out"
    images = [str(p) for p in dev_images(120)]
    all_inputs = images + inputs[-4:]
    result: dict = {}

    def run() -> None:
        try:
            result["summary"] = screen(
                config(all_inputs, out, tiny_models_dir, ray=cluster.address, shard_size=2)
            )
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            result["error"] = exc

    driver = threading.Thread(target=run)
    driver.start()
    wait_for(lambda: parts_count(out) >= 2, "the first parts")
    victim = cluster.list_all_nodes()[-1]  # a worker node, its actor mid-shard
    cluster.remove_node(victim, allow_graceful=False)
    driver.join(timeout=300)
    assert not driver.is_alive(), "the run did not finish after a node died"
    cluster.add_node(num_cpus=1, object_store_memory=STORE)  # back to three for later tests
    cluster.wait_for_nodes()
    assert "error" not in result, result.get("error")
    df = assert_exactly_once(out, all_inputs)
    assert result["summary"].total_rows == len(df)
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "complete"
    assert sum(n["images"] for n in record["cluster"]["per_node"]) == len(df)
    print(
        "CLUSTER",
        json.dumps(
            {
                k: record["cluster"][k]
                for k in ("parts", "shards_done", "shards_found_committed", "per_node")
            }
        ),
    )


def test_driver_sigkill_then_rerun_ends_exactly_once(cluster, inputs, tiny_models_dir, tmp_path):
    out = tmp_path / "out"
    images = [str(p) for p in dev_images(80)]
    all_inputs = images + inputs[-4:]
    command = cxr_argv(
        "screen",
        *all_inputs,
        "--out",
        out,
        "--models",
        tiny_models_dir,
        "--ray",
        cluster.address,
        "--shard-size",
        2,
        "--batch-size",
        2,
        "--no-progress",
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    driver = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        wait_for(lambda: parts_count(out) >= 3 or driver.poll() is not None, "parts")
        assert driver.poll() is None, driver.communicate()
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    killed_run = json.loads((out / "run.json").read_text())
    assert killed_run["status"] == "running"
    done_before = parts_count(out)
    assert done_before < -(-len(expected_keys(all_inputs)) // 2), "the kill came too late"

    rerun = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 3, rerun.stdout + rerun.stderr  # 3: finished, with error rows
    df = assert_exactly_once(out, all_inputs)
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "complete"
    assert record["counts"]["total_rows"] == len(df)
    assert record["counts"]["skipped_existing"] > 0
    # the rerun's parts are numbered after everything the killed run planned
    assert record["cluster"]["parts"]["first"] >= killed_run["cluster"]["parts"]["end"]


def test_workers_of_a_run_that_lost_its_directory_stop(cluster, tiny_models_dir, tmp_path):
    """The fence: once run.json names another run, this run's workers commit nothing more, and
    the worker's error reaches the driver as the engine's own message, out of Ray's wrappers."""
    out = tmp_path / "out"
    images = [str(p) for p in dev_images(60)]
    result: dict = {}

    def run() -> None:
        try:
            screen(config(images, out, tiny_models_dir, ray=cluster.address, shard_size=2))
        except BaseException as exc:  # noqa: BLE001 - examined below
            result["error"] = exc

    driver = threading.Thread(target=run)
    driver.start()
    wait_for(lambda: parts_count(out) >= 1, "the first part")
    record = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**record, "run_id": "intruder"}))
    driver.join(timeout=300)
    assert not driver.is_alive()
    error = result.get("error")
    assert isinstance(error, EngineError), error
    # a worker meets the fence at its next commit, or (restarted) at its start
    assert "is now written by run intruder" in str(error) or "run intruder's" in str(error)
    assert "Traceback" not in str(error)
    assert parts_count(out) < 30
    assert json.loads((out / "run.json").read_text())["status"] == "failed"


def test_ray_refuses_object_storage_urls(cluster, tiny_models_dir, tmp_path):
    code, _, stderr = run_cli(
        ["screen", "s3://bucket/archive", "--out", tmp_path / "o", "--ray", cluster.address]
    )
    assert code == 1
    assert "object storage URLs are not supported" in " ".join(stderr.split())


def readme_ray_blocks() -> list[str]:
    """The bash blocks of the Ray guide (docs/scale.md, linked from the README)."""
    text = (REPO / "docs" / "scale.md").read_text()
    section = text.split("## On a Ray cluster", 1)[1].split("\n## ", 1)[0]
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


def test_readme_ray_examples_run_and_equal_the_local_run(cluster, tmp_path):
    """The Ray guide's --ray examples (docs/scale.md), on the README's example images:
    `--ray auto` joins the cluster RAY_ADDRESS names (the fixture's three nodes stand for
    `ray start --head`), `--ray local` starts its own; both give the single-process run's rows."""
    install, auto, local = readme_ray_blocks()
    assert install in (REPO / ".ci" / "run").read_text(), "CI installs the extra as documented"
    shutil.copytree(REPO / "examples", tmp_path / "examples")
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(REPO),  # the `cxr` script runs this checkout's engine
    }
    commands = ["cxr screen examples --out out"]  # the quick start's run, as the reference
    commands += [line for block in (auto, local) for line in block.splitlines()]
    for command in commands:
        if command.startswith("ray start"):
            continue  # the fixture's cluster
        extra = {"RAY_ADDRESS": cluster.address} if "--ray auto" in command else {}
        done = subprocess.run(
            ["bash", "-c", command],
            cwd=tmp_path,
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, command + "\n" + done.stdout + done.stderr
    reference = rows(tmp_path / "out")
    assert reference.height == 5
    for out in ("out-ray", "out-local-ray"):
        got = rows(tmp_path / out)
        assert got["key"].to_list() == reference["key"].to_list()
        assert got["decision"].to_list() == reference["decision"].to_list()
        diff = np.abs(got["prob"].to_numpy() - reference["prob"].to_numpy()).max()
        assert diff <= 1e-5, out
    nodes = json.loads((tmp_path / "out-ray" / "run.json").read_text())["cluster"]["nodes"]
    assert len(nodes) == 3  # auto joined the cluster of RAY_ADDRESS
    nodes = json.loads((tmp_path / "out-local-ray" / "run.json").read_text())["cluster"]["nodes"]
    assert len(nodes) == 1  # local started its own, RAY_ADDRESS or not


def test_bench_ray_writes_runs_and_the_ratio(tmp_path, tiny_models_dir):
    """In a child process: the script makes itself a subreaper and reaps every orphan."""
    archive = tmp_path / "archive"
    archive.mkdir()
    for image in dev_images(6):
        shutil.copy(image, archive / image.name)
    results = tmp_path / "ray.jsonl"
    args = ["--archive", str(archive), "--models", str(tiny_models_dir), "--pairs", "1"]
    args += ["--shard-size", "4", "--threads", "1", "--work", str(tmp_path / "work")]
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_ray", *args, "--results", str(results)]
        + ["--note", "test"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [json.loads(x) for x in results.read_text().splitlines()]
    assert [x["kind"] for x in lines] == ["run", "run", "summary"]
    assert [x["result"]["mode"] for x in lines[:2]] == ["local", "ray"]
    for x in lines:
        assert x["machine"]["cpu_model"] and x["cpu_flags"] and x["note"] == "test"
    summary = lines[-1]["result"]
    for key in ("ratio_e2e", "ratio_cpu", "ratio_steady", "ray_cpu_s_per_image"):
        assert summary[key] > 0, key
    assert summary["driver"]["entries"] == 6
    assert lines[1]["result"]["cluster"]["actors"]["cpus"] == 1
