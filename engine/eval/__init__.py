"""`cxr evaluate`: score a screened run against labels.

labels.py (CSV + join), metrics.py (NumPy, as scikit-learn defines them), bootstrap.py (patient
cluster bootstrap), retrieval.py (index quality), results.py (EvalConfig and what an evaluation
finds), caveats.py, plots.py, report.py (HTML), evaluate.py (orchestration), cli.py (the command
and the `cxr eval` group engine/cli.py mounts). The release tooling beside it: release.py,
card.py, segmentation.py (with dice.py) and shortcut.py, each also a `python -m` entry point.
"""
