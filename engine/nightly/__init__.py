"""Nightly jobs: what changed tonight, and is the model still seeing what it was trained on?

changes.py  which screened files changed or vanished since they were screened (stat, then sha256)
monitor.py  one run's nightly bookkeeping: the change check before it, drift after it
runs.py     the runs recorded in run.json, one run's rows, the summary a scheduler reads
cli.py      the `cxr runs` command

The drift measures themselves are engine/drift.py (pure NumPy). See docs/nightly.md.
"""
