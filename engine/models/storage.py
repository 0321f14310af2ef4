"""Rewrites of how an ONNX graph stores its weights (float16, per-channel INT8, and back to
float32); the graph computes the same thing in float32 either way."""

from __future__ import annotations

from typing import Any


def _stored_weights(model: Any, store: Any) -> Any:
    """The same graph with each initializer for which store(init) gives (stored initializers,
    decoding node) replaced by those: the node, put first, turns them back into a tensor of the
    initializer's name, so the rest of the graph is unchanged."""
    import onnx

    graph = model.graph
    kept, decoders = [], []
    for init in graph.initializer:
        stored = store(init)
        if stored is None:
            kept.append(init)
            continue
        inits, node = stored
        kept += inits
        decoders.append(node)
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(decoders + nodes)
    onnx.checker.check_model(model)
    return model


def fp16_weights(model: Any, *, min_elements: int = 1024) -> Any:
    """The same graph with large float32 weights stored as float16 + a Cast back to float32.

    Halves the file; compute stays float32 (ONNX Runtime folds the Casts into float32 weights
    when it loads the model), so outputs differ from the original only by the weights' rounding.
    """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    def store(init: Any) -> Any:
        if init.data_type != TensorProto.FLOAT or np.prod(init.dims) < min_elements:
            return None
        half = numpy_helper.from_array(
            numpy_helper.to_array(init).astype(np.float16), f"{init.name}__fp16"
        )
        return [half], helper.make_node("Cast", [half.name], [init.name], to=TensorProto.FLOAT)

    return _stored_weights(model, store)


def w8_weights(model: Any, *, min_elements: int = 1024) -> Any:
    """The same graph with the large Conv/Gemm weights stored as symmetric per-output-channel
    INT8 + a DequantizeLinear back to float32 (about a quarter of the file; compute stays
    float32). `float_weights` undoes the storage for consumers that want plain float weights."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    axis_of: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type == "Conv" and len(node.input) > 1:
            axis_of[node.input[1]] = 0
        elif node.op_type == "Gemm" and len(node.input) > 1:
            trans_b = any(a.name == "transB" and a.i for a in node.attribute)
            axis_of[node.input[1]] = 0 if trans_b else 1

    def store(init: Any) -> Any:
        axis = axis_of.get(init.name)
        if axis is None or init.data_type != TensorProto.FLOAT or np.prod(init.dims) < min_elements:
            return None
        w = numpy_helper.to_array(init).astype(np.float64)
        other = tuple(i for i in range(w.ndim) if i != axis)
        scale = np.abs(w).max(axis=other) / 127.0
        scale[scale == 0] = 1.0
        shape = [1] * w.ndim
        shape[axis] = -1
        q = np.clip(np.round(w / scale.reshape(shape)), -127, 127).astype(np.int8)
        names = [f"{init.name}__w8", f"{init.name}__w8_scale", f"{init.name}__w8_zero_point"]
        stored = [
            numpy_helper.from_array(q, names[0]),
            numpy_helper.from_array(scale.astype(np.float32), names[1]),
            numpy_helper.from_array(np.zeros(len(scale), np.int8), names[2]),
        ]
        return stored, helper.make_node("DequantizeLinear", names, [init.name], axis=axis)

    return _stored_weights(model, store)


def float_weights(model: Any) -> Any:
    """The same graph with every DequantizeLinear of a stored initializer (w8 weights) folded
    into a float32 initializer: what TensorRT's float plans parse. Activation Q/DQ pairs are
    left alone (a QDQ export is not a float model)."""
    import numpy as np
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    folded, nodes = [], []
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or not all(i in inits for i in node.input if i):
            nodes.append(node)
            continue
        q = numpy_helper.to_array(inits[node.input[0]]).astype(np.float64)
        scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
        zp = (
            numpy_helper.to_array(inits[node.input[2]]).astype(np.float64)
            if len(node.input) > 2 and node.input[2]
            else np.zeros(())
        )
        if scale.ndim == 1 and scale.size > 1:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            shape = [1] * q.ndim
            shape[axis] = -1
            scale, zp = scale.reshape(shape), zp.reshape(shape) if zp.ndim else zp
        folded.append(
            numpy_helper.from_array(((q - zp) * scale).astype(np.float32), node.output[0])
        )
    used = {i for n in nodes for i in n.input} | {o.name for o in graph.output}
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept + folded)
    del graph.node[:]
    graph.node.extend(nodes)
    return model
