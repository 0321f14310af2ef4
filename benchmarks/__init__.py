"""Benchmarks of cxr-engine: plain scripts that write JSON lines (see benchmarks/README.md).

A package only so that the scripts can import each other and that ``cxr bench`` (engine/bench.py)
can run them from a source checkout; nothing here is installed with the engine.
"""
