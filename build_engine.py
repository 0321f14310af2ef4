"""Compile the models' ONNX into TensorRT plans: the same command as `cxr build`.

    python build_engine.py --models models [--precision fp16] [--max-batch 64] [--opt-batch 16]
                           [--out models/plans] [--timing-cache models/plans/timing.cache]

Needs the `gpu` extra (TensorRT, cuda-python) and an NVIDIA GPU; see engine/build.py.
"""

from engine.build import main

if __name__ == "__main__":
    main()
