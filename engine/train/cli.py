"""The `cxr train` group: segmenter, classifier, int8, segmenter-int8, generalisation, parity (engine/cli.py
mounts `app`).

The commands only map options onto a config and call the trainer inside
engine.console.fatal_errors, so EngineError becomes a message and exit code 1. torch is imported
only when a command runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from engine.console import config_from_options, fatal_errors
from engine.train import require_torch
from engine.train.parity import parity_command

app = typer.Typer(
    no_args_is_help=True, help="Train the segmenter and the classifier (needs the `train` extra)."
)

# Options both trainers (or all three train commands) take; their defaults are the command's.
OutDir = Annotated[
    str, typer.Option("--out", "-o", metavar="DIR", help="Models directory to write.")
]
MaskIndex = Annotated[
    Path, typer.Option(help="Mask index CSV (image_path, mask_path, patient_id) or its folder.")
]
ImagesRoot = Annotated[Path, typer.Option(help="Folder the CSV's 'path' column is relative to.")]
Epochs = Annotated[int, typer.Option(help="Maximum epochs.")]
BatchSize = Annotated[int, typer.Option(help="Images per step.")]
LearningRate = Annotated[float, typer.Option(help="Peak AdamW learning rate.")]
Threads = Annotated[
    int | None, typer.Option(help="CPU threads for torch and ONNX Runtime (default: all cores).")
]
Precision = Annotated[
    str, typer.Option(help="auto (bf16 where the CPU has AVX512-BF16/AMX) | bf16 | fp32.")
]
Seed = Annotated[int, typer.Option(help="Seed for the patient split, weights and augmentation.")]
CalibrationImages = Annotated[
    int, typer.Option(help="Training crops to calibrate (and tune) the INT8 model on.")
]
Int8TuneEpochs = Annotated[
    int,
    typer.Option(help="Epochs tuning the INT8 weights against FP32 on those crops (0: none)."),
]
FloatDepthwise = Annotated[
    bool,
    typer.Option(help="Leave the depthwise convolutions of the INT8 export in float."),
]
FloatEnds = Annotated[
    int,
    typer.Option(help="Leave the first and the last N convolutions of the INT8 export in float."),
]
ThresholdSensitivity = Annotated[
    float | None,
    typer.Option(
        help="Choose the threshold as the highest one whose sensitivity on the validation "
        "positives is at least this (default: Youden's J)."
    ),
]
MaxSteps = Annotated[
    int | None, typer.Option(help="Stop after this many optimiser steps (smoke runs).")
]


def _threads(threads: int | None) -> int:
    from engine.config import check_threads, default_threads

    return check_threads(threads) if threads else default_threads()


@app.command("segmenter", help="Train the lung U-Net on image/mask pairs.")
def train_segmenter(
    ctx: typer.Context,
    masks: MaskIndex,
    out: OutDir,
    labels: Annotated[
        Path | None,
        typer.Option(help="The classifier's labels CSV: share its patient split (recommended)."),
    ] = None,
    epochs: Epochs = 60,
    seed: Seed = 0,
    arch: Annotated[
        str, typer.Option(help="unet | unet-s8 | unet-128 | unet-s8-128 | tiny-unet")
    ] = "unet",
    max_steps: MaxSteps = None,
    batch_size: BatchSize = 8,
    lr: LearningRate = 1e-3,
    patience: Annotated[int, typer.Option(help="Epochs without a better val Dice.")] = 12,
    threads: Threads = None,
    precision: Precision = "auto",
    teacher: Annotated[
        Path | None,
        typer.Option(
            help="Models directory of a segmenter to imitate (e.g. the shipped one) on "
            "--teacher-images, beside the human masks: a cheaper U-Net then keeps its boxes."
        ),
    ] = None,
    teacher_images: Annotated[
        Path | None,
        typer.Option(
            help="Unlabelled pool for --teacher: a CSV with a 'path' column (relative to its "
            "folder) or a folder. Must not hold the mask pairs or the --labels images."
        ),
    ] = None,
    teacher_per_epoch: Annotated[
        int, typer.Option(help="Pool images per epoch (5% of the pool is held out).")
    ] = 1024,
    cache: Annotated[
        Path | None, typer.Option(help="Folder that keeps the teacher's targets between runs.")
    ] = None,
) -> None:
    """Train the lung U-Net on image/mask pairs; write segmenter.onnx + segmenter.json."""
    from engine.config import output_path

    with fatal_errors():
        out_dir = output_path(out)
        require_torch()
        from engine.train.segmenter import SegmenterTrainConfig
        from engine.train.segmenter import train_segmenter as run

        run(config_from_options(SegmenterTrainConfig, ctx, out=out_dir, threads=_threads(threads)))


@app.command("classifier", help="Train the ResNet50 on lung crops.")
def train_classifier(
    ctx: typer.Context,
    labels: Annotated[
        list[Path],
        typer.Option(
            help="Labels CSV (path, label, patient_id[, source]). Give it again for more sets: "
            "the first set's patient split chooses the epoch and threshold and holds the test "
            "patients; the others are training data (a slice per source held out)."
        ),
    ],
    segmenter: Annotated[
        Path, typer.Option(help="Models directory holding the trained segmenter.json.")
    ],
    out: OutDir,
    images: Annotated[
        list[Path] | None,
        typer.Option(
            help="Folder each --labels CSV's 'path' column is relative to, one per --labels in "
            "the same order (default: each CSV's own folder)."
        ),
    ] = None,
    epochs: Epochs = 80,
    seed: Seed = 0,
    arch: Annotated[
        str,
        typer.Option(help="resnet50 | tiny-classifier | efficientnet-lite0 (ImageNet-pretrained)"),
    ] = "resnet50",
    max_steps: MaxSteps = None,
    batch_size: BatchSize = 16,
    lr: LearningRate = 5e-4,
    patience: Annotated[
        int,
        typer.Option(
            help="Stop after this many epochs without a better val ROC AUC (the default, 80, "
            "runs the whole schedule; the best epoch is kept either way)."
        ),
    ] = 80,
    hflip: Annotated[
        bool, typer.Option(help="Random horizontal flips (off: anatomy is not symmetric).")
    ] = False,
    epoch_images: Annotated[
        int | None,
        typer.Option(help="Images drawn per epoch (default: as many as there are to train on)."),
    ] = None,
    source_balance: Annotated[
        float,
        typer.Option(
            help="Within each class, each source's share of an epoch ~ its size ** (1 - this) "
            "(0: as in the data, 1: equal per source)."
        ),
    ] = 0.5,
    select_source: Annotated[
        str | None,
        typer.Option(
            help="Choose the epoch on the validation images of this source only (e.g. "
            "ieee8023: COVID-19 vs other pneumonias of one collection)."
        ),
    ] = None,
    exclude_from_training: Annotated[
        list[str] | None,
        typer.Option(
            help="SOURCE:LABEL never trained on (leave-one-source-out check; scored at the end "
            "as unseen images), e.g. nih-chestxray14:0. Repeatable."
        ),
    ] = None,
    holdout: Annotated[
        float,
        typer.Option(help="Share of each further set's sources held out as a second check."),
    ] = 0.05,
    acquisition: Annotated[
        bool, typer.Option(help="Randomise the acquisition look (tone, resolution, JPEG, noise).")
    ] = True,
    standardize: Annotated[
        bool, typer.Option(help="Standardise each image (mean 0, std 1) inside the network.")
    ] = True,
    context_swap: Annotated[
        float,
        typer.Option(
            help="Share of training crops whose context outside the (dilated) lung mask comes "
            "from another image of the batch, so that markers, borders and the film's look "
            "outside the lungs stop predicting the label (0: off)."
        ),
    ] = 0.0,
    consistency: Annotated[
        float,
        typer.Option(
            help="Weight of a two-view term: every training crop is drawn twice (another box "
            "jitter and augmentation) and the squared difference of its two logits is added to "
            "the loss, so the score stops depending on where the box falls (0: off; doubles the "
            "cost of a step)."
        ),
    ] = 0.0,
    threshold_sensitivity: ThresholdSensitivity = None,
    cache: Annotated[
        Path | None,
        typer.Option(help="Crop cache folder, shared between runs (default: OUT/crop-cache)."),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(help="Continue the run whose checkpoint is in OUT (same options)."),
    ] = False,
    calibration_images: CalibrationImages = 256,
    int8_tune_epochs: Int8TuneEpochs = 12,
    int8_float_depthwise: FloatDepthwise = False,
    int8_float_ends: FloatEnds = 0,
    threads: Threads = None,
    precision: Precision = "auto",
) -> None:
    """Train the classifier on lung crops; write classifier.onnx (+ INT8) + classifier.json."""
    from engine.config import output_path

    with fatal_errors():
        out_dir = output_path(out)
        require_torch()
        from engine.train.classifier import ClassifierTrainConfig
        from engine.train.classifier import train_classifier as run
        from engine.train.datasets import pair_sets

        sets = pair_sets(labels, images or [])
        run(
            config_from_options(
                ClassifierTrainConfig,
                ctx,
                labels=sets[0].labels,
                images=sets[0].images,
                extra=sets[1:],
                out=out_dir,
                exclude=tuple(exclude_from_training or ()),
                threads=_threads(threads),
            )
        )


# Options of the commands that redo a step of a trained classifier directory.
TrainedModels = Annotated[
    Path, typer.Option(help="Models directory `cxr train classifier --out` wrote.")
]
TrainedLabels = Annotated[
    list[Path],
    typer.Option(
        help="The labels CSV(s) the classifier was trained on, all of them, in the same order."
    ),
]
TrainedImages = Annotated[
    list[Path] | None,
    typer.Option(help="Folder of each --labels CSV, in the same order (default: its folder)."),
]
CacheDir = Annotated[
    Path | None,
    typer.Option(help="Crop cache folder (default: MODELS/crop-cache)."),
]


@app.command("int8", help="Redo a trained classifier's INT8 export (calibrate, tune, parity).")
def train_int8(
    models: TrainedModels,
    labels: TrainedLabels,
    images: TrainedImages = None,
    calibration_images: CalibrationImages = 256,
    int8_tune_epochs: Int8TuneEpochs = 12,
    tune_images: Annotated[
        int | None,
        typer.Option(
            help="Training crops to tune on, the calibration crops first and further sets' "
            "crops spread over their sources (default: the calibration crops)."
        ),
    ] = None,
    float_depthwise: FloatDepthwise = False,
    float_ends: FloatEnds = 0,
    cache: CacheDir = None,
    threads: Threads = None,
) -> None:
    """Redo a trained classifier's INT8 export (calibration, tuning, parity); no retraining."""

    with fatal_errors():
        require_torch()
        from engine.train.datasets import pair_sets
        from engine.train.redo import requantize_int8

        m = requantize_int8(
            models,
            pair_sets(labels, images or []),
            calibration_images=calibration_images,
            int8_tune_epochs=int8_tune_epochs,
            int8_tune_images=tune_images,
            float_depthwise=float_depthwise,
            float_ends=float_ends,
            cache=cache,
            threads=_threads(threads),
        )
        par = m.variants["int8"].parity
        typer.echo(
            f"{m.directory / m.variants['int8'].onnx}: same decision as FP32 "
            f"{par['same_decision']:.4f} (held-out {par.get('same_decision_held_out')}), "
            f"ROC AUC diff {par['roc_auc_diff']}, embedding cosine min "
            f"{par['embedding_cosine_min']:.4f}"
        )


@app.command(
    "threshold",
    help="Choose a trained classifier's threshold again, by Youden's J or a sensitivity.",
)
def train_threshold(
    models: TrainedModels,
    labels: TrainedLabels,
    images: TrainedImages = None,
    threshold_sensitivity: ThresholdSensitivity = None,
    test_time_crops: Annotated[
        int | None,
        typer.Option(
            help="Serve the mean of this many crops an image, their boxes moved and scaled as "
            "in training's box jitter (1: one crop; default: as the manifest has it).",
        ),
    ] = None,
    tta_seed: Annotated[int, typer.Option(help="Seed that draws those crops' box transforms.")] = 0,
    cache: CacheDir = None,
    threads: Threads = None,
) -> None:
    """Re-choose the threshold on the validation patients and rewrite what depends on it (card
    metrics, INT8 parity, held-out figures); the weights are unchanged. With
    --test-time-crops, for the classifier served the mean over that many crops."""

    with fatal_errors():
        require_torch()
        from engine.train.datasets import pair_sets
        from engine.train.redo import rethreshold

        m = rethreshold(
            models,
            pair_sets(labels, images or []),
            threshold_sensitivity=threshold_sensitivity,
            test_time_crops=test_time_crops,
            tta_seed=tta_seed,
            cache=cache,
            threads=_threads(threads),
        )
        test = m.card["metrics"].get("test", {}).get("all", {})
        crops = f", {len(m.tta)} test-time crops" if m.tta else ""
        typer.echo(
            f"{m.directory}: threshold {m.threshold:.4f} ({m.card['threshold_rule']}{crops}); "
            f"test sensitivity {test.get('sensitivity')}, specificity {test.get('specificity')}"
        )


@app.command("segmenter-int8", help="INT8 export of the segmenter, with box IoU and Dice parity.")
def train_segmenter_int8(
    models: Annotated[
        Path, typer.Option(help="Models directory with the FP32 segmenter and splits.csv.")
    ],
    masks: MaskIndex,
    labels: Annotated[Path, typer.Option(help="Labels CSV: the images box IoU is measured on.")],
    images: ImagesRoot,
    calibration_images: Annotated[
        int, typer.Option(help="Mask images of training patients to calibrate on.")
    ] = 64,
    float_ends: Annotated[
        int,
        typer.Option(
            help="Leave the first and the last N convolutions in float (the last writes the "
            "logits whose threshold decides the box edges)."
        ),
    ] = 0,
    box_min_region: Annotated[
        float | None,
        typer.Option(
            help="Set the segmenter's box rule first: mask regions below this share of the "
            "mask's pixels do not count for the lung box (e.g. 0.002; 0: every pixel counts). "
            "Default: the manifest's."
        ),
    ] = None,
    threads: Threads = None,
) -> None:
    """INT8 export of the segmenter, with its parity (lung-box IoU, Dice) recorded."""
    with fatal_errors():
        require_torch()
        from engine.train.segmenter_int8 import export_segmenter_int8

        par = export_segmenter_int8(
            models,
            masks,
            labels,
            images,
            calibration_images=calibration_images,
            float_ends=float_ends,
            box_min_region=box_min_region,
            threads=_threads(threads),
        )
        typer.echo(
            f"{models}/segmenter.int8.onnx: box IoU min {par['box_iou_min']:.4f} over "
            f"{par['images']} images, Dice drop {par['dice_drop']:.4f}; meets the bar: "
            f"{'yes' if par['meets_bar'] else 'no'}"
        )


@app.command(
    "generalisation",
    help="Source probe and downscale agreement of any classifier (written into its card).",
)
def train_generalisation(
    models: Annotated[Path, typer.Option(help="Models directory with its splits.csv.")],
    labels: Annotated[
        list[Path],
        typer.Option(help="Labels CSVs: the classifier's own first, then further sets."),
    ],
    cache: Annotated[Path, typer.Option(help="Crop cache folder (shared with `cxr train`).")],
    images: Annotated[
        list[Path] | None, typer.Option(help="Folder of each --labels CSV (default: its own).")
    ] = None,
    write: Annotated[
        bool, typer.Option(help="Write the figures into the classifier's card (classifier.json).")
    ] = False,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the figures to this JSON file.")
    ] = None,
    threads: Threads = None,
) -> None:
    """Measure the source probe (held-out images of every set) and the downscale agreement
    (the first set's test images) of a classifier, e.g. one shipped before they were recorded."""
    import json
    from dataclasses import replace

    with fatal_errors():
        from engine.models import load_manifest, manifest_path, save_manifest
        from engine.train.generalisation import measure_models

        figures = measure_models(
            models, list(labels), list(images or []), cache=cache, threads=_threads(threads)
        )
        if json_out is not None:
            json_out.write_text(json.dumps(figures, indent=2, allow_nan=False) + "\n")
        if write:
            m = load_manifest(manifest_path(models, "classifier"))
            save_manifest(replace(m, card=dict(m.card) | figures), m.directory)
        da = figures["downscale_agreement"]
        probe = {
            k: v["roc_auc"]
            for k, v in figures["source_probe"].items()
            if k != "method" and isinstance(v, dict)
        }
        typer.echo(
            f"source probe ROC AUC {probe}; downscale agreement {da['same_decision']} "
            f"(ROC AUC {da['roc_auc_full']} full, {da['roc_auc_downscaled']} at {da['side']} px)"
        )


app.command(
    "parity",
    help="Parity of a packed classifier with its FP32 export (python -m engine.train.parity).",
)(parity_command)
