"""ROC, precision-recall and reliability plots as PNG bytes (matplotlib, Agg, no pyplot state).

Each function takes the evaluated series, draws one figure and returns the encoded PNG, so the
report can both write the file and embed it. A series with one class only has no curve and is
left out of the plot (its legend says so).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from engine.errors import EngineError
from engine.eval import metrics as m


@dataclass(frozen=True, slots=True)
class Series:
    name: str
    y: np.ndarray
    prob: np.ndarray
    decision: np.ndarray


def _figure(title: str, xlabel: str, ylabel: str):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise EngineError(
            "plots need matplotlib, which is not installed: pip install matplotlib"
        ) from None
    fig = Figure(figsize=(5.5, 5.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel, xlim=(0, 1), ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    return fig, ax


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _both_classes(s: Series) -> bool:
    return 0 < int(s.y.sum()) < s.y.size


def roc_png(series: Sequence[Series]) -> bytes:
    fig, ax = _figure("ROC curve", "1 - specificity (false positive rate)", "sensitivity")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="chance")
    for s in series:
        if not _both_classes(s):
            ax.plot([], [], linestyle="none", label=f"{s.name}: one class, no curve")
            continue
        fpr, tpr, _ = m.roc_curve(s.y, s.prob)
        line = ax.plot(fpr, tpr, label=f"{s.name} (AUC {m.roc_auc(s.y, s.prob):.3f})")[0]
        rates = m.rates(m.confusion(s.y, s.decision))
        ax.plot(1 - rates["specificity"], rates["sensitivity"], "o", color=line.get_color())
    ax.legend(loc="lower right", fontsize="small", title="dot: the run's threshold")
    return _png(fig)


def pr_png(series: Sequence[Series]) -> bytes:
    fig, ax = _figure("Precision-recall curve", "recall (sensitivity)", "precision (PPV)")
    for s in series:
        if not _both_classes(s):
            ax.plot([], [], linestyle="none", label=f"{s.name}: one class, no curve")
            continue
        precision, recall, _ = m.precision_recall_curve(s.y, s.prob)
        ap = m.average_precision(s.y, s.prob)
        line = ax.step(recall, precision, where="post", label=f"{s.name} (AP {ap:.3f})")[0]
        ax.axhline(s.y.mean(), color=line.get_color(), linestyle=":", linewidth=1)
    ax.legend(loc="lower left", fontsize="small", title="dotted: prevalence (chance)")
    return _png(fig)


def reliability_png(r: m.Reliability, name: str = "all") -> bytes:
    fig, ax = _figure(
        f"Reliability diagram ({name}; ECE {r.ece:.3f}, {r.count.size} equal-width bins)",
        "mean predicted probability",
        "observed share of positives",
    )
    ax.title.set_fontsize("medium")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="perfect calibration")
    filled = r.count > 0
    centres = (r.edges[:-1] + r.edges[1:]) / 2
    width = np.diff(r.edges)
    ax.bar(
        centres, np.where(filled, r.observed, 0), width=width * 0.9, alpha=0.35, label="observed"
    )
    ax.plot(r.mean_prob[filled], r.observed[filled], "o-", label="bins with images")
    share = r.count / max(int(r.count.sum()), 1)
    ax.bar(centres, share * 0.25, width=width * 0.9, bottom=0, color="black", alpha=0.15)
    ax.text(0.02, 0.9, "grey bars: share of images per bin (x 0.25)", fontsize="x-small")
    ax.legend(loc="upper left", fontsize="small", bbox_to_anchor=(0, 0.88))
    return _png(fig)
