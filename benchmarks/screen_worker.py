"""The child side of bench_screen.py: one configuration, measured in a process of its own.

`python -m benchmarks.bench_screen --worker SPEC.json` runs `worker`, which reads the spec the
parent wrote (a `Config`, defined here) and writes SPEC.result.json beside it. A process per
configuration keeps peak RSS, warm caches and patched modules from leaking from one
configuration into the next.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import Meter, cores, peak_rss_mib, percentiles_ms
from engine.errors import ConfigError


@dataclass(frozen=True)
class Config:
    kind: str
    precision: str = "fp32"
    batch_size: int = 1
    decoder: str = "dali"
    decode_threads: int = 1
    ort_threads: int = 1
    decode_workers: int = 0  # ScreenConfig.decode_workers; 0: decode_threads (the default's)
    reference: bool = False

    @property
    def name(self) -> str:
        if self.kind == "naive":
            return f"naive {self.precision} b1 t{self.ort_threads}"
        if self.kind == "model-only":
            return f"model-only {self.precision} b{self.batch_size} t{self.ort_threads}"
        return (
            f"{self.kind} {self.precision} b{self.batch_size} {self.decoder} "
            f"t{self.decode_threads}:{self.ort_threads}"
            + (f" w{self.decode_workers}" if self.decode_workers else "")
        )


def decoder_draft(decoder: str) -> int | None:
    """None for DALI and for "auto" (the engine's own choice, `cxr screen --decoder auto`), else
    the Pillow preprocessor's draft factor (0: full decode)."""
    if decoder in ("dali", "auto"):
        return None
    if decoder == "pillow":
        return 0
    if decoder == "pillow-draft":
        return 2
    if decoder.startswith("pillow-draft") and decoder[12:].isdigit() and int(decoder[12:]) > 0:
        return int(decoder[12:])
    raise ConfigError(
        f"unknown --decoder {decoder!r}: auto, dali, pillow, pillow-draft (= pillow-draft2), "
        "pillow-draftK"
    )


def worker(spec_path: Path) -> None:
    """Run one configuration (in its own process) and write its result next to the spec."""
    spec = json.loads(spec_path.read_text())
    cfg = Config(**spec["config"])
    fn = {
        "model-only": _child_model_only,
        "naive": _child_naive,
        "null": _child_screen,
        "engine": _child_screen,
    }[cfg.kind]
    result = fn(cfg, spec)
    result["peak_rss_mib"] = round(peak_rss_mib(), 1)
    result["cores"] = cores()
    spec_path.with_suffix(".result.json").write_text(json.dumps(result))


# What the patched factory built in this process, e.g. "Preprocessor" or "PilPreprocessor(draft=2)"
BUILT: list[str] = []


def _patch_screener(cfg: Config) -> None:
    """Make engine.screener build the wanted preprocessor with the wanted thread count.

    The Screener is asked for decoder "dali" (_screen_config), so it calls
    engine.screener.Preprocessor, replaced here by a factory that builds the configuration's
    preprocessor (DALI, or Pillow with its draft factor) with its own decode thread count. What it
    built is recorded in the result, so a configuration cannot silently run another decoder.
    Decoder "auto" is the engine as `cxr screen` runs it: nothing is patched.
    """
    import engine.screener as screener
    from engine.pipeline import Preprocessor

    if cfg.decoder == "auto":
        return
    draft = decoder_draft(cfg.decoder)
    decode_threads = cfg.decode_threads

    def make(models, *, device="cpu", batch_size, threads):  # noqa: ANN001 - Preprocessor's
        if draft is None:
            BUILT.append("Preprocessor")
            return Preprocessor(
                models, device=device, batch_size=batch_size, threads=decode_threads
            )
        from engine.pipeline_pil import PilPreprocessor

        BUILT.append(f"PilPreprocessor(draft={draft})")
        return PilPreprocessor(
            models, device=device, batch_size=batch_size, threads=decode_threads, draft=draft
        )

    screener.Preprocessor = make  # type: ignore[assignment,misc]


def _screen_config(cfg: Config, models: str, inputs: list[str], out: Path):
    from engine.config import ScreenConfig

    return ScreenConfig(
        inputs=tuple(Path(p) for p in inputs),
        out=out,
        models=Path(models),
        backend="null" if cfg.kind == "null" else "onnxruntime",
        precision=cfg.precision,
        # "dali" routes through the patched engine.screener.Preprocessor (_patch_screener)
        decoder="auto" if cfg.decoder == "auto" else "dali",
        batch_size=cfg.batch_size,
        threads=cfg.ort_threads,
        # the readers and (Pillow) decoders: as many as the decode threads unless asked
        decode_workers=cfg.decode_workers or cfg.decode_threads,
        progress=False,
    )


def _child_screen(cfg: Config, spec: dict[str, Any]) -> dict[str, Any]:
    from engine.runner import screen

    _patch_screener(cfg)
    out = Path(spec["out"])
    inputs = spec["inputs"]
    warm = spec["warmup_inputs"]
    screen(_screen_config(cfg, spec["models"], warm, out / "warmup"))
    with Meter() as meter:
        summary = screen(_screen_config(cfg, spec["models"], inputs, out / "run"))
    n = summary.processed
    stage_s = {k: round(v, 4) for k, v in summary.stage_s.items()}
    result = {
        "images": n,
        "ok": summary.ok,
        "errors": summary.errors,
        "error_samples": summary.error_samples[:3],
        "wall_s": round(meter.wall_s, 3),
        "images_per_s": n / meter.wall_s if meter.wall_s > 0 else 0.0,
        "pipeline_wall_s": round(summary.wall_s, 3),
        "pipeline_images_per_s": summary.images_per_s,
        "stage_busy_s": stage_s,
        "stage_images_per_s": {k: (n / v if v > 0 else None) for k, v in stage_s.items()},
        "batch_latency_ms": summary.batch_latency_ms,
        "cpu_s": round(meter.cpu_s, 3),
        "cpu_utilisation": round(meter.utilisation(), 4),
        "warmup_images": len(warm),
        "preprocessor": sorted(set(BUILT)),
        "decoder": summary.decoder,  # as the run recorded it ("dali" when patched)
        "decode_workers": summary.decode_workers,
    }
    if spec.get("dev") and cfg.kind == "engine":
        dev = screen(_screen_config(cfg, spec["models"], spec["dev"], out / "dev"))
        result["dev_images"] = dev.processed
    return result


def _child_naive(cfg: Config, spec: dict[str, Any]) -> dict[str, Any]:
    from benchmarks.naive import run_naive
    from engine.models import load_models

    models = load_models(Path(spec["models"]), precision="fp32")
    inputs = [Path(p) for p in spec["inputs"]]
    source = inputs[0] if len(inputs) == 1 else inputs
    r = run_naive(models, source, limit=spec["naive_limit"], threads=cfg.ort_threads)
    lat = percentiles_ms(r.seconds)
    return {
        "images": len(r.names),
        "ok": len(r.names),
        "errors": len(r.errors),
        "error_samples": list(r.errors.values())[:3],
        "wall_s": round(r.wall_s, 3),
        "images_per_s": r.images_per_s,
        "image_latency_ms": lat,
        "batch_latency_ms": {k: lat[k] for k in ("p50", "p99")} if lat else {},
        "cpu_s": round(r.cpu_s, 3),
        "cpu_utilisation": round(r.cpu_s / r.wall_s / cores(), 4) if r.wall_s else 0.0,
        "note": "batch latency = per-image latency (batch 1); rate over the timed loop",
    }


def _child_model_only(cfg: Config, spec: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    from engine.models import load_models
    from engine.runtime.onnxrt import OnnxRuntimeBackend

    models = load_models(Path(spec["models"]), precision=cfg.precision)
    seg = OnnxRuntimeBackend(models.segmenter, threads=cfg.ort_threads)
    clf = OnnxRuntimeBackend(models.classifier, threads=cfg.ort_threads)
    seg.load()
    clf.load()
    rng = np.random.default_rng(0)
    b = cfg.batch_size
    x_seg = rng.standard_normal((b, *_dims(models.segmenter))).astype(np.float32)
    crops = max(len(models.classifier.tta), 1)  # the classifier's test-time crops an image
    x_clf = rng.standard_normal((b * crops, *_dims(models.classifier))).astype(np.float32)
    feeds_seg = {models.segmenter.input.name: x_seg}
    feeds_clf = {models.classifier.input.name: x_clf}
    seg.infer(feeds_seg)  # warm-up
    clf.infer(feeds_clf)
    seg_s, clf_s = [], []
    want = max(3, -(-int(spec["model_only_images"]) // b))
    with Meter() as meter:
        for _ in range(want):
            t0 = time.perf_counter()
            seg.infer(feeds_seg)
            t1 = time.perf_counter()
            clf.infer(feeds_clf)
            t2 = time.perf_counter()
            seg_s.append(t1 - t0)
            clf_s.append(t2 - t1)
    n = want * b
    total = [a + c for a, c in zip(seg_s, clf_s, strict=True)]
    lat = percentiles_ms(total)
    return {
        "images": n,
        "wall_s": round(meter.wall_s, 3),
        "images_per_s": n / meter.wall_s,
        "stage_images_per_s": {"segment": n / sum(seg_s), "classify": n / sum(clf_s)},
        "batch_latency_ms": {"p50": lat["p50"], "p99": lat["p99"]},
        "cpu_s": round(meter.cpu_s, 3),
        "cpu_utilisation": round(meter.utilisation(), 4),
    }


def _dims(manifest) -> tuple[int, ...]:
    """The network input's shape without the batch dimension (fixed in our manifests)."""
    return tuple(int(d) for d in manifest.input.shape[1:])
