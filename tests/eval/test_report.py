"""engine.eval.report: the files of `cxr evaluate --report` (metrics.json equal to the
evaluation's JSON, three PNGs, one self-contained HTML), what the HTML says and how (caveats
first, escaped text, undefined values, intervals, groups, retrieval), and an unwritable folder."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from test_results import score

from engine.errors import EngineError
from engine.eval import report
from engine.eval.bootstrap import Interval
from engine.eval.labels import MatchCounts
from engine.eval.results import EvalConfig, Evaluation
from engine.eval.retrieval import Retrieval, RetrievalScore

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FILES = ["metrics.json", "pr.png", "reliability.png", "report.html", "roc.png"]


def evaluation(
    tmp_path: Path, *, caveats=("Tiny set <b>& co</b>",), retrieval=True, bootstrap=100
) -> Evaluation:
    y = np.array([1, 1, 0, 0, 1, 0, 0, 0])
    prob = np.array([0.9, 0.6, 0.7, 0.2, 0.8, 0.1, 0.3, 0.4])
    decision = prob >= 0.5
    group = np.array(["x", "x", "x", "x", "y", "y", "y", "y"])
    rows = pl.DataFrame({"label": y, "prob": prob, "decision": decision, "group": group})
    ci = {"accuracy": Interval(0.5, 0.95, 90, 100), "f1": Interval(0.4, 0.9, 100, 100)}
    overall = score(y, prob, decision, intervals=ci if bootstrap else {})
    groups = {
        g: score(y[group == g], prob[group == g], decision[group == g], name=g) for g in ("x", "y")
    }
    rs = RetrievalScore(
        queries=8,
        precision_at_k=0.625,
        chance_precision_at_k=0.5,
        same_patient_queries=0,
        same_patient_hit_rate=float("nan"),
    )
    ret = Retrieval(k=3, neighbours=3, not_in_index=0, overall=rs, groups={"x": rs})
    return Evaluation(
        config=EvalConfig(
            out=tmp_path / "out<1>", labels=tmp_path / "labels.csv", by="site", bootstrap=bootstrap
        ),
        run={"model_id": "tiny-classifier", "trained": False, "thresholds": [0.5, 0.25]},
        counts=MatchCounts(
            labelled=9, found=8, missing=1, ambiguous=0, errors=0, evaluated=8, unlabelled=2
        ),
        overall=overall,
        groups=groups,
        retrieval=ret if retrieval else None,
        caveats=list(caveats),
        rows=rows,
    )


def test_write_report_writes_the_five_files_and_nothing_else(tmp_path):
    e = evaluation(tmp_path)
    html = report.write_report(e, tmp_path / "deep" / "report")
    folder = tmp_path / "deep" / "report"
    assert html == folder / "report.html"
    assert sorted(p.name for p in folder.iterdir()) == FILES  # no temporary file left
    for name in ("roc.png", "pr.png", "reliability.png"):
        assert (folder / name).read_bytes().startswith(PNG_MAGIC)
    assert json.loads((folder / "metrics.json").read_text()) == json.loads(json.dumps(e.to_json()))
    # written again over itself: the same files
    report.write_report(e, folder)
    assert sorted(p.name for p in folder.iterdir()) == FILES


def test_the_html_embeds_the_pngs_it_wrote_and_links_nothing(tmp_path):
    html_path = report.write_report(evaluation(tmp_path), tmp_path / "r")
    html = html_path.read_text()
    embedded = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([^"]+)">', html)
    assert [name for name, _ in embedded] == ["roc.png", "pr.png", "reliability.png"]
    for name, data in embedded:
        assert base64.b64decode(data) == (tmp_path / "r" / name).read_bytes()
    assert "http://" not in html and "https://" not in html and "<link" not in html
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")


def test_html_caveats_come_first_and_text_is_escaped(tmp_path):
    html = report.render_html(evaluation(tmp_path), {})
    assert html.index("<h2>Caveats</h2>") < html.index("<h2>Classification</h2>")
    assert "<li>Tiny set &lt;b&gt;&amp; co&lt;/b&gt;</li>" in html
    assert "<b>& co</b>" not in html
    assert f"<h1>Evaluation of {tmp_path}/out&lt;1&gt;</h1>" in html
    html = report.render_html(evaluation(tmp_path, caveats=()), {})
    assert '<div class="caveats"><ul><li>none found</li></ul></div>' in html


def test_html_facts_metrics_and_confusion(tmp_path):
    html = report.render_html(evaluation(tmp_path), {})
    assert "<tr><td>model</td><td>tiny-classifier (trained: False)</td></tr>" in html
    assert "<tr><td>decision threshold(s)</td><td>0.5, 0.25</td></tr>" in html
    assert "<tr><td>missing from the run</td><td>1</td></tr>" in html
    assert "<tr><td>prediction rows without a label</td><td>2</td></tr>" in html
    # header: overall, then one column per group named `by = name`
    assert "<th>all</th><th>site = x</th><th>site = y</th></tr>" in html
    accuracy = re.search(r"<tr><td>accuracy</td>(.*?)</tr>", html).group(1)
    # an interval with fewer valid resamples says how many; a full one does not
    # 7 of 8 right overall, 3 of 4 in x, 4 of 4 in y; the groups have no intervals
    assert accuracy == (
        "<td>0.875 <span class='ci'>[0.500, 0.950] n=90</span></td><td>0.750</td><td>1.000</td>"
    )
    f1 = re.search(r"<tr><td>F1</td>(.*?)</tr>", html).group(1)
    assert f1.startswith("<td>0.857 <span class='ci'>[0.400, 0.900]</span></td>")
    # confusion table: images, patients, positive, negative, TP, FP, TN, FN per group
    assert (
        "<tr><td>all</td><td>8</td><td>8</td><td>3</td><td>5</td><td>3</td><td>1</td><td>4</td><td>0</td></tr>"
        in html
    )
    assert (
        "<tr><td>y</td><td>4</td><td>4</td><td>1</td><td>3</td><td>1</td><td>0</td><td>3</td><td>0</td></tr>"
        in html
    )


def test_html_undefined_values_and_retrieval(tmp_path):
    e = evaluation(tmp_path)
    e.groups["y"] = score(np.zeros(3, int), np.array([0.1, 0.2, 0.3]), np.zeros(3, bool), name="y")
    html = report.render_html(e, {})
    roc = re.search(r"<tr><td>ROC AUC</td>(.*?)</tr>", html).group(1)
    assert roc.endswith("<td>undefined</td>")
    assert "<h2>Retrieval (k = 3)</h2>" in html
    assert (
        "<tr><td>all</td><td>8</td><td>0.625</td><td>0.500</td><td>0</td><td>undefined</td></tr>"
        in html
    )
    assert "<tr><td>x</td>" in html.split("<h2>Retrieval")[1]
    html = report.render_html(evaluation(tmp_path, retrieval=False), {})
    assert "<h2>Retrieval</h2><p>not measured (see the caveats)</p>" in html


def test_html_methods_state_the_bootstrap_settings(tmp_path):
    html = report.render_html(evaluation(tmp_path, bootstrap=0), {})
    assert "0 resamples, seed 0." in html
    assert "<span class='ci'>" not in html.split("<h2>Classification</h2>")[1].split("<h2>")[0]


def test_an_unwritable_report_folder_is_an_engine_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(
        EngineError, match=r"--report .*file/r: cannot write .*choose a writable folder"
    ):
        report.write_report(evaluation(tmp_path), blocker / "r")
