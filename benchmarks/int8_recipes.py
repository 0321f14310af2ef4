"""INT8 calibration recipes side by side: parity with FP32 and speed, on a trained classifier.

    python -m benchmarks.int8_recipes --trained TRAINED_DIR --labels LABELS.csv --images ROOT \\
        [--recipes minmax,percentile,percentile-head,percentile-head-t8,minmax-s8] \
        [--out results.jsonl]

TRAINED_DIR is what `cxr train classifier --out` wrote. Every recipe quantizes the FP32 export
on the same calibration crops the training uses (engine.train.classifier.calibration_inputs:
every unaugmented training crop, then augmented ones up to 256), then is scored on the
unaugmented crops of every labelled image against the FP32 ONNX (engine.train.export's parity
record: same decision at the manifest's threshold, ROC AUC difference, embedding cosine).
Speed: img/s of the INT8 and the FP32 sessions on the same 64 crops, one after the other, and
their ratio. One JSON line per recipe on stdout and appended to --out.

Recipe names: METHOD[-PERCENTILE][-head][-pre][-eN][-s8][-tEPOCHS[s][h]] with METHOD minmax |
percentile | entropy; "-head": the head (pool, flatten, Gemm) left in float; "-pre": the nodes
before the first convolution (input standardisation) left in float; "-eN": the first and last N
convolutions left in float; "-s8": symmetric S8 activations
(what TensorRT's explicit quantization needs); "-tEPOCHS": then the integer weights tuned
against FP32 for that many epochs on the calibration crops (engine/train/int8_tune.py), "s"
after the epochs: the activation scales learned too, "h": then the float head refit on the INT8
embeddings (engine.train.int8_tune.refit_head; needs "-head"). The training default is
percentile-head-pre-t12sh. Parity rows also give the same decision on the held-out
(validation + test) images alone, which neither calibration nor tuning saw.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from engine.models import meets_parity_bar
from engine.train.classifier import HEAD_OPS, calibration_inputs
from engine.train.data import log
from engine.train.export import (
    Int8Recipe,
    export_parity,
    ort_run,
    ort_session,
    quantize_int8,
)
from engine.train.int8_tune import Int8Tuning, refit_head, tune_int8
from engine.train.redo import reference_outputs

METHODS = ("minmax", "percentile", "entropy")
TUNE = re.compile(r"^t(\d+)(s?)(h?)$")
ENDS = re.compile(r"^e(\d+)$")


def parse_recipe(name: str) -> tuple[Int8Recipe, Int8Tuning | None, bool]:
    """The calibration recipe, the tuning (None: none) and whether the head is refit after
    it, that a recipe name stands for."""
    parts = name.split("-")
    method, rest = parts[0], parts[1:]
    if method not in METHODS:
        raise ValueError(f"recipe {name!r}: method must be one of {METHODS}")
    kw: dict[str, Any] = {"method": method}
    tuning, refit = None, False
    if rest and (m := TUNE.match(rest[-1])):
        tuning = Int8Tuning(epochs=int(m[1]), learn_scales=bool(m[2]))
        refit = bool(m[3])
        rest = rest[:-1]
    if rest and rest[-1] == "s8":
        kw["symmetric_activations"] = True
        rest = rest[:-1]
    if rest and (m := ENDS.match(rest[-1])):
        kw["float_ends"] = int(m[1])
        rest = rest[:-1]
    if rest and rest[-1] == "pre":
        kw["float_prelude"] = True
        rest = rest[:-1]
    if rest and rest[-1] == "head":
        kw["exclude_op_types"] = HEAD_OPS
        rest = rest[:-1]
    if rest:
        if method != "percentile" or len(rest) != 1:
            raise ValueError(f"recipe {name!r}: only percentile takes a number")
        try:
            kw["percentile"] = float(rest[0])
        except ValueError:
            raise ValueError(f"recipe {name!r}: {rest[0]!r} is not a percentile") from None
    if refit and "exclude_op_types" not in kw:
        raise ValueError(f"recipe {name!r}: the head refit needs the head in float (-head)")
    return Int8Recipe(**kw), tuning, refit


def img_per_s(path: Path, x: np.ndarray, threads: int) -> float:
    session = ort_session(path, threads)
    ort_run(session, x[:8])  # warm-up
    t = time.perf_counter()
    ort_run(session, x)
    return len(x) / (time.perf_counter() - t)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trained", type=Path, required=True)
    p.add_argument("--labels", type=Path, required=True)
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--recipes", default="minmax,percentile,entropy")
    p.add_argument("--calibration-images", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="calibration crops and tuning")
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    recipes = {name: parse_recipe(name) for name in a.recipes.split(",") if name}
    teacher: dict[str, np.ndarray] | None = None

    clf, data, fp32 = reference_outputs(a.trained, a.labels, a.images, threads=a.threads)
    calib, patients = calibration_inputs(data, clf, a.calibration_images, a.seed)
    speed_x = data.inputs[:64]
    with tempfile.TemporaryDirectory(prefix="cxr-int8-recipes-") as tmp:
        for name, (recipe, tuning, refit) in recipes.items():
            path = Path(tmp) / f"{name}.onnx"
            log(f"{name}: calibrating on {len(calib)} training crops")
            t = time.perf_counter()
            quantize_int8(clf.onnx_path, path, calib, recipe)
            seconds = time.perf_counter() - t
            tuned: dict[str, Any] = {"epochs": 0}
            if tuning is not None:
                if teacher is None:
                    teacher = ort_run(ort_session(clf.onnx_path, a.threads), calib)
                tuning = replace(tuning, seed=a.seed)
                tuned = tune_int8(path, calib, teacher, tuning, a.threads)
                if refit:
                    tuned["head_refit"] = refit_head(
                        path, calib, teacher, a.threads, patients=patients
                    )
            par = export_parity(
                fp32,
                path,
                data.inputs,
                data.labels,
                clf.threshold,
                a.threads,
                held_out=data.split != "train",
            )
            int8_ips = img_per_s(path, speed_x, a.threads)
            fp32_ips = img_per_s(clf.onnx_path, speed_x, a.threads)
            row = {
                "recipe": name,
                **recipe.describe(),
                "model": f"{clf.onnx_path} sha256 {clf.sha256[:12]}",
                "calibration_images": len(calib),
                "calibration_s": round(seconds, 1),
                "tuning": tuned,
                "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                **par,
                "meets_bar": meets_parity_bar(par["same_decision"], par.get("roc_auc_diff")),
                "int8_img_s": round(int8_ips, 1),
                "fp32_img_s": round(fp32_ips, 1),
                "int8_over_fp32": round(int8_ips / fp32_ips, 2),
                "threads": a.threads,
            }
            line = json.dumps(row)
            print(line, flush=True)
            if a.out:
                with open(a.out, "a") as f:
                    f.write(line + "\n")


if __name__ == "__main__":
    main()
