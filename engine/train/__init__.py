"""Torch training and ONNX export (the `train` extra). Never imported by inference.

Importing this package does not import torch; the trainers do, when they run.
"""
