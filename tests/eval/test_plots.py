"""engine.eval.plots: each figure is a PNG of the stated size; what is drawn (curves, their AUC
and AP labels, the run's operating point, prevalence, reliability bins) read back from the
figure itself; one-class series are listed, not drawn; no matplotlib is a readable error."""

from __future__ import annotations

import io
import sys

import numpy as np
import pytest
from PIL import Image

from engine.errors import EngineError
from engine.eval import metrics as m
from engine.eval import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def series(name: str, y, prob, decision=None) -> plots.Series:
    y = np.asarray(y)
    prob = np.asarray(prob, float)
    decision = prob >= 0.5 if decision is None else np.asarray(decision, bool)
    return plots.Series(name=name, y=y, prob=prob, decision=decision)


MIXED = series("all", [1, 1, 0, 0, 1, 0], [0.9, 0.4, 0.6, 0.2, 0.7, 0.1])
ONE_CLASS = series("nih", [0, 0, 0], [0.2, 0.7, 0.1])


@pytest.fixture
def drawn(monkeypatch):
    """The figures the functions draw, kept instead of encoded."""
    figures = []

    def keep(fig) -> bytes:
        figures.append(fig)
        return b""

    monkeypatch.setattr(plots, "_png", keep)
    return figures


def legend(fig) -> list[str]:
    return [t.get_text() for t in fig.axes[0].get_legend().get_texts()]


@pytest.mark.parametrize(
    "draw",
    [
        lambda: plots.roc_png([MIXED, ONE_CLASS]),
        lambda: plots.pr_png([MIXED, ONE_CLASS]),
        lambda: plots.reliability_png(m.reliability(MIXED.y, MIXED.prob)),
    ],
    ids=["roc", "pr", "reliability"],
)
def test_each_plot_is_a_png_of_550_by_500(draw):
    png = draw()
    assert png.startswith(PNG_MAGIC)
    with Image.open(io.BytesIO(png)) as im:
        assert im.size == (550, 500)


def test_roc_draws_chance_each_curve_with_its_auc_and_the_run_s_operating_point(drawn):
    plots.roc_png([MIXED, ONE_CLASS])
    (fig,) = drawn
    auc = m.roc_auc(MIXED.y, MIXED.prob)
    assert legend(fig) == ["chance", f"all (AUC {auc:.3f})", "nih: one class, no curve"]
    ax = fig.axes[0]
    assert ax.get_title() == "ROC curve"
    lines = ax.get_lines()
    fpr, tpr, _ = m.roc_curve(MIXED.y, MIXED.prob)
    np.testing.assert_array_equal(lines[1].get_xdata(), fpr)
    np.testing.assert_array_equal(lines[1].get_ydata(), tpr)
    # the dot: the run's own decisions, 1 - specificity and sensitivity
    rates = m.rates(m.confusion(MIXED.y, MIXED.decision))
    dot = lines[2]
    assert dot.get_marker() == "o" and dot.get_color() == lines[1].get_color()
    assert list(dot.get_xdata()) == [1 - rates["specificity"]]
    assert list(dot.get_ydata()) == [rates["sensitivity"]]
    assert len(lines[3].get_xdata()) == 0  # the one-class series: a legend entry only


def test_pr_draws_each_curve_with_its_average_precision_and_prevalence(drawn):
    plots.pr_png([ONE_CLASS, MIXED])
    (fig,) = drawn
    ap = m.average_precision(MIXED.y, MIXED.prob)
    assert legend(fig) == ["nih: one class, no curve", f"all (AP {ap:.3f})"]
    prevalence = fig.axes[0].get_lines()[-1]
    assert list(prevalence.get_ydata()) == [0.5, 0.5]  # axhline at y.mean()


def test_reliability_title_bars_and_points_of_filled_bins(drawn):
    r = m.reliability(MIXED.y, MIXED.prob)
    plots.reliability_png(r, name="site x")
    (fig,) = drawn
    ax = fig.axes[0]
    assert ax.get_title() == f"Reliability diagram (site x; ECE {r.ece:.3f}, 10 equal-width bins)"
    points = next(line for line in ax.get_lines() if line.get_label() == "bins with images")
    filled = r.count > 0
    np.testing.assert_array_equal(points.get_xdata(), r.mean_prob[filled])
    np.testing.assert_array_equal(points.get_ydata(), r.observed[filled])
    heights = [p.get_height() for p in ax.patches]
    assert len(heights) == 20  # observed share and image share, one bar each per bin
    np.testing.assert_allclose(heights[:10], np.where(filled, r.observed, 0))
    np.testing.assert_allclose(heights[10:], r.count / r.count.sum() * 0.25)


def test_reliability_of_no_images_still_draws():
    r = m.reliability(np.array([], int), np.array([], float))
    assert plots.reliability_png(r).startswith(PNG_MAGIC)


def test_without_matplotlib_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(EngineError, match="pip install matplotlib"):
        plots.roc_png([MIXED])
