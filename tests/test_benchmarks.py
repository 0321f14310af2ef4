"""Smoke tests of benchmarks/ (tiny models, a few small images).

What they pin down: make_archive writes distinct files of the requested formats and sizes;
bench_screen writes one JSON line per configuration with the agreed keys and sane ratios; the
naive baseline computes the engine's numbers (so the speed ratio compares equal work);
bench_usearch measures recall against an exact scan. The Pillow preprocessor the benchmarks
compare (engine/pipeline_pil.py) is tested in test_pipeline_pil.py, `cxr bench` in test_bench.py.
"""

from __future__ import annotations

import hashlib
import json
import math
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import archive_files, benchmarks_importable, dev_images, require_data, small_archive
from PIL import Image

benchmarks_importable()
from benchmarks import bench_screen, bench_usearch, quality  # noqa: E402
from benchmarks.make_archive import ArchiveSpec, make_archive  # noqa: E402
from benchmarks.naive import run_naive  # noqa: E402
from engine.errors import ConfigError  # noqa: E402

# The naive loop and the engine run the same ONNX files on inputs that agree to float32
# rounding (the engine's DALI resize vs Pillow's, see test_pipeline.py). Measured: 9 real dev
# images + 24 archive images of 2048-3000 px (JPEG, 16-bit PNG, DICOM MONOCHROME1/2), tiny and
# full models: |prob difference| <= 9.7e-7, embedding cosine >= 0.9999998, same decisions.
NAIVE_PROB_TOL = 1e-5
NAIVE_COSINE_MIN = 0.9999


def test_make_archive_formats_sizes_and_distinct_files(bench_archive):
    files = sorted(
        p for p in (bench_archive / "tree").rglob("*") if p.suffix in (".jpg", ".png", ".dcm")
    )
    assert len(files) == 9
    digests = {hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    assert len(digests) == 9, "two archive files are byte-identical"
    photometric = []
    for p in files:
        if p.suffix == ".dcm":
            import pydicom

            ds = pydicom.dcmread(p)
            assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
            assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit) == (16, 12, 11)
            assert "WindowCenter" in ds and "RescaleSlope" in ds
            assert int(ds.pixel_array.max()) <= 4095
            photometric.append(ds.PhotometricInterpretation)
            side = max(ds.Rows, ds.Columns)
        else:
            with Image.open(p) as im:
                assert im.format == ("JPEG" if p.suffix == ".jpg" else "PNG")
                assert im.mode == ("L" if p.suffix == ".jpg" else "I;16")
                if im.mode == "I;16":
                    assert 0 < np.asarray(im).max() <= 4095  # 12-bit data in 16 bits
                side = max(im.size)
        assert 96 <= side <= 160
    assert sorted(set(photometric)) == ["MONOCHROME1", "MONOCHROME2"]
    with tarfile.open(bench_archive / "tree.tar") as tf:
        assert len([m for m in tf.getmembers() if m.isfile()]) == 9
    summary = json.loads((bench_archive / "tree" / "archive.json").read_text())
    assert summary["counts"] == {"jpeg": 3, "png16": 3, "dicom": 3}


def test_make_archive_is_deterministic(bench_archive, tmp_path):
    make_archive(small_archive(tmp_path / "again", 2), workers=1)
    made = [p for p in (tmp_path / "again").rglob("*") if p.suffix in (".jpg", ".png")]
    assert len(made) == 2
    for p in made:
        twin = bench_archive / "tree" / p.relative_to(tmp_path / "again")
        assert p.read_bytes() == twin.read_bytes()


def test_make_archive_carries_the_source_labels(tmp_path):
    """--labels: each archive image gets the label row of the real image it was made from."""
    import csv

    src = dev_images(1)[0].parent  # ../shared/data/cxr-dev/images
    labels = src.parent / "labels.csv"
    spec = ArchiveSpec(
        out=str(tmp_path / "lab"), count=5, formats=("jpeg",), long_side=(64, 80), source=str(src)
    )
    summary = make_archive(spec, workers=1, labels=labels)
    with open(labels, newline="") as f:
        truth = {Path(r["path"]).stem: r for r in csv.DictReader(f)}
    with open(tmp_path / "lab" / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert summary["labelled"] == len(rows) == 5
    for r in rows:
        made = tmp_path / "lab" / r["path"]
        assert made.is_file()
        stem = made.stem.rsplit("-", 1)[0]  # <source-stem>-<index>
        assert (r["label"], r["patient_id"], r["source"]) == (
            truth[stem]["label"],
            truth[stem]["patient_id"],
            truth[stem]["source"],
        )


@pytest.mark.parametrize("crops", [1, 3], ids=["one-crop", "test-time-crops"])
def test_naive_baseline_matches_engine(bench_archive, tiny_models_dir, tmp_path, crops):
    import shutil

    from engine.config import ScreenConfig
    from engine.models import load_manifest, load_models, manifest_path, save_manifest
    from engine.runner import screen

    models_dir = tiny_models_dir
    if crops > 1:  # the classifier's own test-time crops: the naive loop cuts them too
        models_dir = Path(shutil.copytree(tiny_models_dir, tmp_path / "models"))
        clf = load_manifest(manifest_path(models_dir, "classifier"))
        tta = ((1.05, 0.95, 0.03, -0.02), (0.94, 1.06, -0.03, 0.02), (1.0, 1.0, 0.0, 0.0))
        save_manifest(replace(clf, tta=tta[:crops]), models_dir)
    files = [p.resolve() for p in dev_images(9)] + archive_files(bench_archive)
    summary = screen(  # the engine's reference decoder: the naive loop decodes fully too
        ScreenConfig(
            inputs=tuple(files),
            out=tmp_path / "out",
            models=models_dir,
            decoder="dali",
            progress=False,
        )
    )
    assert summary.ok == len(files)
    engine_out = quality.read_run(tmp_path / "out")
    naive = run_naive(load_models(models_dir, precision="fp32"), files, limit=None, threads=2)
    assert not naive.errors and len(naive.names) == len(files)
    got = quality.from_arrays(naive.names, naive.prob, naive.embedding, engine_out.threshold)
    agree = quality.agreement(engine_out, got)
    assert agree["images"] == len(files)
    assert agree["prob_max_abs_diff"] <= NAIVE_PROB_TOL, agree
    assert agree["embedding_cosine_min"] >= NAIVE_COSINE_MIN, agree
    assert agree["same_decision"] == 1.0


def test_bench_screen_writes_one_line_per_configuration(bench_archive, tiny_models_dir, tmp_path):
    results = tmp_path / "screen.jsonl"
    opts = bench_screen.BenchOptions(
        archive=bench_archive / "tree",
        models=tiny_models_dir,
        precisions=("fp32", "int8"),  # the tiny models have no INT8 export: reported skipped
        batch_sizes=(4,),
        threads=2,
        decoders=("dali", "pillow-draft"),
        naive_limit=4,
        warmup=4,
        model_only_images=8,
        quality_limit=6,
        results=results,
        quiet=True,
    )
    records = bench_screen.run_bench(opts)
    lines = [json.loads(x) for x in results.read_text().splitlines()]
    assert lines == json.loads(json.dumps(records))
    by_name = {r["config"]["name"]: r for r in lines}
    ok = [r for r in lines if r["status"] == "ok"]
    assert {r["config"]["kind"] for r in ok} == {"model-only", "naive", "null", "engine"}
    # model-only, naive, null per decoder (2), engine dali (reference), engine pillow-draft
    assert len(ok) == 6
    assert by_name["null fp32 b4 pillow-draft t2:2"]["result"]["preprocessor"] == [
        "PilPreprocessor(draft=2)"
    ]
    skipped = [r for r in lines if r["status"] == "skipped"]
    assert skipped and all(r["config"]["precision"] == "int8" and r["reason"] for r in skipped)
    for r in lines:
        assert r["schema"] == "cxr-bench/1" and r["bench"] == "screen"
        assert r["machine"]["cores"] >= 1 and r["machine"]["cpu_model"]
        assert r["libraries"]["onnxruntime"] and r["git_commit"]
        assert len({r["run_id"] for r in lines}) == 1
    for r in ok:
        res = r["result"]
        assert res["images_per_s"] > 0 and res["peak_rss_mib"] > 0
        assert 0 <= res["cpu_utilisation"] <= 1.5
        assert set(res["batch_latency_ms"]) >= {"p50", "p99"}
    ref = by_name["engine fp32 b4 dali t2:2"]
    assert ref["config"]["reference"] and ref["result"]["images"] == 9
    assert set(ref["result"]["stage_images_per_s"]) == set(bench_screen.STAGES)
    for r in (ref, by_name["engine fp32 b4 pillow-draft t2:2"], by_name["null fp32 b4 dali t2:2"]):
        ratios = r["ratios"]
        assert {"vs_naive", "vs_model_only", "vs_null"} <= set(ratios) or r["config"][
            "kind"
        ] == "null"
        for key in ("vs_naive", "vs_model_only"):
            assert math.isfinite(ratios[key]) and ratios[key] > 0
            other = by_name[ratios[key.replace("vs_", "") + "_config"]]
            assert ratios[key] == pytest.approx(
                r["result"]["images_per_s"] / other["result"]["images_per_s"], rel=1e-3
            )
    # each configuration ran the decoder it names (not the engine's default decoder)
    assert ref["result"]["preprocessor"] == ["Preprocessor"]
    draft_run = by_name["engine fp32 b4 pillow-draft t2:2"]["result"]
    assert draft_run["preprocessor"] == ["PilPreprocessor(draft=2)"]
    q = by_name["engine fp32 b4 pillow-draft t2:2"]["quality"]
    assert q["reference"] == ref["config"]["name"]
    assert q["archive"]["images"] == 9 and q["dev"]["images"] == 6
    assert q["dev"]["same_decision"] == 1.0 and q["dev"]["labelled"] == 6
    # both classes among the 6 spread dev images; with untrained models the AUC itself (and so
    # its difference) is noise around 0.5, so only its presence is checked
    assert q["dev"]["roc_auc_ref"] is not None and q["dev"]["roc_auc_diff"] is not None


def tiny_fp32_bench(bench_archive, tiny_models_dir, **kw) -> bench_screen.BenchOptions:
    """BenchOptions over the bench archive's tree with the tiny models, FP32, batch 4, 2 threads."""
    return bench_screen.BenchOptions(
        archive=bench_archive / "tree",
        models=tiny_models_dir,
        precisions=("fp32",),
        batch_sizes=(4,),
        threads=2,
        **kw,
    )


def test_bench_screen_rounds_are_runs_of_their_own_and_give_medians(
    bench_archive, tiny_models_dir, tmp_path, capsys
):
    results = tmp_path / "screen.jsonl"
    opts = tiny_fp32_bench(
        bench_archive,
        tiny_models_dir,
        configs=("naive", "engine"),
        naive_limit=4,
        warmup=4,
        quality=False,
        results=results,
        rounds=2,
    )
    records = bench_screen.run_bench(opts)
    lines = [json.loads(x) for x in results.read_text().splitlines()]
    assert lines == json.loads(json.dumps(records)) and len(lines) == 4  # 2 configs x 2 rounds
    assert len({r["run_id"] for r in lines}) == 2 and len({r["series"] for r in lines}) == 1
    assert [r["round"] for r in lines] == [1, 1, 2, 2] and {r["rounds"] for r in lines} == {2}
    engines = [r for r in lines if r["config"]["kind"] == "engine"]
    for r in engines:  # each round's ratio is against that round's naive loop
        naive = next(n for n in lines if n["run_id"] == r["run_id"] and n is not r)
        assert r["ratios"]["vs_naive"] == pytest.approx(
            r["result"]["images_per_s"] / naive["result"]["images_per_s"], rel=1e-3
        )
    med = bench_screen.round_medians([lines[:2], lines[2:]])
    ratios = [r["ratios"]["vs_naive"] for r in engines]
    row = med["engine fp32 b4 dali t2:2"]["vs_naive"]
    assert row["n"] == 2 and row["min"] == min(ratios) and row["max"] == max(ratios)
    assert row["median"] == pytest.approx(sum(ratios) / 2)
    out = capsys.readouterr().out
    assert "over 2 rounds: median (min-max)" in out and "x naive" in out
    with pytest.raises(ConfigError, match="--rounds must be at least 1, not 0"):
        bench_screen.BenchOptions(rounds=0)


def test_bench_screen_runs_the_engine_defaults_and_decode_workers(
    bench_archive, tiny_models_dir, tmp_path
):
    """--decoder auto is `cxr screen` unpatched (the CPU default decoder); --decode-workers sweeps
    the readers/decoders, each line recording what ran (issue 17: PNG and DICOM vs ceiling)."""
    from engine.config import CPU_DECODER

    opts = tiny_fp32_bench(
        bench_archive,
        tiny_models_dir,
        decoders=("auto",),
        decode_workers=(0, 3),
        configs=("engine",),
        warmup=4,
        quality=False,
        results=tmp_path / "screen.jsonl",
        quiet=True,
    )
    names = [c.name for c in bench_screen.plan(opts)]
    assert names == [
        "engine fp32 b4 dali t2:2",
        "engine fp32 b4 auto t2:2",
        "engine fp32 b4 auto t2:2 w3",
    ]
    by_name = {r["config"]["name"]: r for r in bench_screen.run_bench(opts)}
    assert all(r["status"] == "ok" and r["result"]["images"] == 9 for r in by_name.values())
    ref = by_name["engine fp32 b4 dali t2:2"]["result"]
    assert (ref["preprocessor"], ref["decode_workers"]) == (["Preprocessor"], 2)
    for name, workers in (("engine fp32 b4 auto t2:2", 2), ("engine fp32 b4 auto t2:2 w3", 3)):
        res = by_name[name]["result"]
        assert res["preprocessor"] == []  # nothing patched: the engine chose its decoder
        assert (res["decoder"], res["decode_workers"]) == (CPU_DECODER, workers)
    with pytest.raises(ConfigError, match="--decode-workers"):
        bench_screen.BenchOptions(decode_workers=(-1,))


def test_bench_decode_measures_each_worker_count_in_turn(bench_archive, tmp_path):
    from benchmarks.bench_decode import main, run_decode_bench

    results = tmp_path / "decode.jsonl"
    lines = run_decode_bench(
        bench_archive / "tree", workers=(2, 1), rounds=2, limit=None, results=results
    )
    assert [json.loads(x) for x in results.read_text().splitlines()] == lines
    assert [line["config"]["workers"] for line in lines] == [1, 2]  # 1 first: the baseline
    for line in lines:
        r = line["result"]
        assert line["bench"] == "decode" and line["config"]["images"] == 9
        assert r["images_ok"] == 9  # JPEG, 16-bit PNG and DICOM all read and decoded
        assert len(r["images_per_s_rounds"]) == len(r["speedup_rounds"]) == 2
        assert r["images_per_s"] > 0 and r["cpu_s_per_image"] > 0 and r["cores_busy"] > 0
    assert lines[0]["result"]["speedup"] == 1.0
    assert main(["--archive", str(tmp_path / "nothing"), "--results", str(results)]) == 1


def test_gil_released_share_tells_c_calls_that_release_the_gil_from_python_code():
    from benchmarks.bench_decode import gil_released_share

    data = bytes(20_000_000)

    def python_loop() -> None:
        total = 0
        for i in range(2_000_000):
            total += i

    # measured 1.00 and 0.00 (once 0.38 for a single 20 MB hash: a few time slices of a loaded
    # machine are too few to share fairly, hence 8 of them and the wide margin)
    assert gil_released_share(lambda: [hashlib.sha256(data).digest() for _ in range(8)]) > 0.3
    assert gil_released_share(python_loop) < 0.1


# --------------------------------------------------------------------------- usearch


def test_bench_usearch_measures_recall_against_exact_search(tmp_path, tiny_models_dir):
    require_data()  # `cxr similar` is timed on real dev images
    results = tmp_path / "usearch.jsonl"
    opts = bench_usearch.UsearchOptions(
        sizes=(3000,),
        dim=64,
        queries=50,
        single_queries=20,
        connectivity=(8, 16),
        expansion_search=(8, 64),
        clusters=20,
        intrinsic_dim=16,
        similar_images=4,
        similar_reps=1,
        cli_reps=0,
        models=tiny_models_dir,
        results=results,
        quiet=True,
    )
    records = bench_usearch.run(opts)
    lines = [json.loads(x) for x in results.read_text().splitlines()]
    assert len(lines) == len(records) == 3  # two builds, one `cxr similar`
    for r in lines[:2]:
        res = r["result"]
        assert res["size"] == 3000 and res["build_s"] > 0 and res["bytes_on_disk"] > 3000 * 64 * 2
        recalls = [s["recall_at_k"] for s in res["searches"]]
        assert all(0 <= x <= 1 for x in recalls) and recalls[-1] >= 0.9
        assert recalls[-1] >= recalls[0]  # a wider search finds at least as much
        assert res["searches"][0]["single_query_ms"]["p50"] > 0
        assert r["data"]["cosine_1st_neighbour_mean"] > r["data"]["cosine_random_pair_mean"]
    sim = lines[2]["result"]
    assert sim["images_in_index"] == 4
    assert sim["in_process_by_key_ms"]["p50"] > 0 and sim["in_process_by_file_ms"]["p50"] > 0


def test_exact_top_k_is_exact():
    rng = np.random.default_rng(0)
    base = rng.standard_normal((500, 16)).astype(np.float16)
    base /= np.linalg.norm(base.astype(np.float32), axis=1, keepdims=True).astype(np.float16)
    q = rng.standard_normal((7, 16)).astype(np.float16)
    keys, _ = bench_usearch.exact_top_k(base, q, 5)
    b = base.astype(np.float32)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    qq = q.astype(np.float32)
    qq /= np.linalg.norm(qq, axis=1, keepdims=True)
    want = np.argsort(-(qq @ b.T), axis=1)[:, :5]
    assert np.array_equal(keys, want)


def test_int8_recipe_names():
    pytest.importorskip("torch")
    from benchmarks.int8_recipes import HEAD_OPS, parse_recipe
    from engine.train.classifier import INT8_RECIPE
    from engine.train.int8_tune import Int8Tuning

    assert parse_recipe("minmax")[0].describe()["method"] == "MinMax"
    r, tuning, refit = parse_recipe("percentile-99.99-s8")
    assert (r.method, r.percentile, r.symmetric_activations) == ("percentile", 99.99, True)
    assert tuning is None and not r.exclude_op_types and not refit
    assert parse_recipe("entropy-s8")[0].symmetric_activations
    r, tuning, refit = parse_recipe("percentile-head-t8")
    assert (r.method, r.exclude_op_types) == ("percentile", HEAD_OPS)
    assert tuning is not None and (tuning.epochs, tuning.learn_scales, refit) == (8, False, False)
    tuning = parse_recipe("minmax-t12s")[1]
    assert tuning is not None and (tuning.epochs, tuning.learn_scales) == (12, True)
    # the training default: Percentile, head in float, 12 epochs with scales, head refit
    r, tuning, refit = parse_recipe("percentile-head-pre-t12sh")
    assert r == INT8_RECIPE and tuning == Int8Tuning() and refit
    # the training default is one of these names
    assert parse_recipe("percentile-head-pre")[0] == INT8_RECIPE
    r = parse_recipe("percentile-head-pre-e2-t4sh")[0]
    assert (r.float_prelude, r.float_ends, r.exclude_op_types) == (True, 2, HEAD_OPS)
    assert parse_recipe("minmax-e1")[0].float_ends == 1
    for bad in (
        "median",
        "minmax-99.9",
        "percentile-1-2",
        "percentile-x-t8",
        "minmax-t",
        "minmax-t8x",
        "minmax-t8h",  # a head refit needs the head in float
        "minmax-ex",
        "minmax-pre-head",  # the order of the name
    ):
        with pytest.raises(ValueError, match="recipe"):
            parse_recipe(bad)


def test_drift_calibration_runs_every_night_and_scenario(tmp_path, tiny_models_dir):
    from conftest import DATA

    from benchmarks import drift_calibration

    if not (DATA / "cxr-train" / "labels.csv").is_file():
        pytest.skip(f"cxr-train not found under {DATA}")
    results = tmp_path / "drift.jsonl"
    args = ["--data", DATA, "--work", tmp_path / "work", "--models", tiny_models_dir]
    args += ["--dev-images", "16", "--per-source", "6", "--inverted", "6", "--draws", "3"]
    assert drift_calibration.main([str(a) for a in [*args, "--out", results]]) == 0
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    nights = [r for r in lines if r["kind"] == "night"]
    assert [r["night"] for r in nights] == [
        "dev",
        "dev-rescreen",
        "radiography-db",
        "nih-chestxray14",
        "dev-inverted",
    ]
    assert [r["images"] for r in nights] == [16, 16, 6, 6, 6]
    assert nights[0]["drift"]["status"] == "reference"
    assert nights[1]["drift"]["metrics"]["psi"] == 0.0  # the same images again
    null = [r for r in lines if r["kind"] == "null"]
    assert [r["n_new"] for r in null] == list(drift_calibration.SIZES)
    assert {r["set"] for r in lines if r["kind"] == "shifted"} == {
        "dev-rescreen",
        "radiography-db",
        "nih-chestxray14",
        "dev-inverted",
    }
    for r in null:
        assert set(r["measures"]) == set(drift_calibration.MEASURES)
        assert r["draws"] == 3 and "any" in r["flag_rate_at_defaults"]
    assert lines[-1]["kind"] == "null_max" and lines[-1]["machine"]["cores"] >= 1


def test_conv_macs_counts_every_conv_and_up_conv_of_the_tiny_unet(tiny_models):
    import onnx

    from benchmarks.bench_segmenters import conv_macs

    # tiny-unet (base 4, depth 2, 64 px), pixels x weights per conv: enc 147,456 + 589,824 and
    # 294,912 + 589,824; bottleneck 294,912 + 589,824; up-convs (per input pixel) 131,072 each;
    # dec 1,179,648 + 589,824 twice; 1x1 head 16,384
    assert conv_macs(onnx.load(str(tiny_models.segmenter.onnx_path))) == 6_324_224


def test_bench_segmenters_measures_each_segmenter_against_the_reference(tiny_models_dir, tmp_path):
    """One line per segmenter with its speed ratio to the reference (measured in turns), MACs,
    the card's Dice; with labels, box IoU against the reference's boxes on every image; with
    masks, test Dice at the reference's size (of the test pairs of segmenter_splits.csv)."""
    import csv
    import shutil

    pytest.importorskip("torch", reason="the box and Dice comparisons need the train extra")
    from conftest import DATA

    from benchmarks.bench_segmenters import format_table, run_segmenter_bench
    from engine.models import init_models

    masks = DATA / "lung-masks"
    if not (masks / "index.csv").is_file():
        pytest.skip(f"no lung masks at {masks}")
    images = dev_images(3)
    labels = tmp_path / "labels.csv"
    rows = "".join(f"{p.name},{min(i, 1)},p{i}\n" for i, p in enumerate(images))
    labels.write_text("path,label,patient_id\n" + rows)
    reference = tmp_path / "reference"
    shutil.copytree(tiny_models_dir, reference)
    other = init_models(tmp_path / "other", size="tiny", seed=1).segmenter.directory
    with open(masks / "index.csv", newline="") as f:
        pairs = list(csv.DictReader(f))[:3]
    for directory in (reference, other):  # what `cxr train segmenter` writes beside its model
        with open(directory / "segmenter_splits.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["image_path", "mask_path", "patient_id", "split"])
            w.writerows([p["image_path"], p["mask_path"], p["patient_id"], "test"] for p in pairs)
    results = tmp_path / "segmenters.jsonl"
    lines = run_segmenter_bench(
        reference,
        [reference, other],
        batch_size=2,
        threads=1,
        rounds=2,
        batches=1,
        labels=labels,
        images=images[0].parent,
        masks=masks,
        results=results,
    )
    assert [json.loads(x)["segmenter"] for x in results.read_text().splitlines()] == [
        str(reference),
        str(reference),
        str(other),
    ]
    ref, same, seeded = lines
    assert ref["speed_ratio"] == 1.0 and len(ref["img_per_s_rounds"]) == 2
    assert same["macs_per_image"] == seeded["macs_per_image"] == 6_324_224
    assert ref["input"] == [64, 64] and ref["machine"]["cpu_flags"] is not None
    assert same["boxes_vs_reference"]["box_iou_min"] == 1.0
    assert same["boxes_vs_reference"]["images"] == 3
    assert 0.0 <= seeded["boxes_vs_reference"]["box_iou_mean"] <= 1.0
    # the reference's classifier on each segmenter's crops: the reference itself decides alike
    decided = [ln["boxes_vs_reference"]["decisions_vs_reference"] for ln in lines]
    assert decided[1]["same_decision"] == 1.0 and decided[1]["max_abs_prob_change"] == 0.0
    assert (
        decided[1]["roc_auc"] == decided[1]["roc_auc_reference"] == decided[2]["roc_auc_reference"]
    )
    assert decided[2]["images"] == 3 and 0.0 <= decided[2]["same_decision"] <= 1.0
    assert decided[2]["classifier"] == str(reference)
    dice = [ln["test_dice_at_reference_size"] for ln in lines]
    assert dice[0] == dice[1] and dice[0]["images"] == 3 and dice[0]["side"] == 64
    assert all(d["same_test_images"] for d in dice) and 0.0 <= dice[2]["mean"] <= 1.0
    assert "| tiny-unet | 64 |" in format_table(lines)
    assert "| 1.0000 (0 changed) |" in format_table(lines)
