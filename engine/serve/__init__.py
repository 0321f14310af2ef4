"""`cxr serve`: a local web app to review a `cxr screen` output directory.

app.py (FastAPI routes), store.py (lazy Parquet queries), images.py (recorded source -> PNG),
cli.py (the Typer command), static/ (the page: HTML, CSS, vanilla JS).
"""
