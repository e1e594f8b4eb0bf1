"""LeNet-5 as an ONNX model, built node by node with the `onnx` package (the `export` extra).

The graph is model.py's forward with data.normalize in front, so it takes raw pixels:

    images  float32 (N,28,28), values 0..255 (MNIST's bytes, cast)
      * 1/(255*0.3081) + (-0.1307/0.3081)           data.normalize, the same float32 constants
      Unsqueeze -> (N,1,28,28)
      Conv 6@5x5 pads 2 -> MaxPool 2x2 -> Relu        (N,6,14,14)
      Conv 16@5x5       -> MaxPool 2x2 -> Relu        (N,16,5,5)
      Flatten -> (N,400), (C,H,W) order as fc1 expects
      Gemm 120 -> Relu -> Gemm 84 -> Relu -> Gemm 10   logits (N,10)
      Softmax                                         probabilities (N,10)

Weights keep PyTorch's layout (model.PARAM_SPECS), which is also ONNX's: Conv weights (out,in,kh,kw),
Gemm with transB=1 over (out,in) matrices.
"""
from __future__ import annotations

import numpy as np

from lenet_dist.data import _SCALE, _SHIFT
from lenet_dist.nn.model import PARAM_SPECS

OPSET = 17
IR_VERSION = 8                  # readable by onnxruntime 1.10 and later


def build(params, *, step=None, doc=""):
    """An onnx.ModelProto for the named float32 parameters `params` (PARAM_SPECS names and shapes)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    for name, shape in PARAM_SPECS:
        if np.shape(params[name]) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {np.shape(params[name])}")
    inits = [numpy_helper.from_array(np.asarray(params[name], np.float32), name) for name, _ in PARAM_SPECS]
    inits += [numpy_helper.from_array(np.array(_SCALE, np.float32), "norm.scale"),
              numpy_helper.from_array(np.array(_SHIFT, np.float32), "norm.shift"),
              numpy_helper.from_array(np.array([1], np.int64), "channel_axis")]
    pool = dict(kernel_shape=[2, 2], strides=[2, 2])
    node = helper.make_node
    nodes = [
        node("Mul", ["images", "norm.scale"], ["scaled"]),
        node("Add", ["scaled", "norm.shift"], ["normalized"]),
        node("Unsqueeze", ["normalized", "channel_axis"], ["x"]),                        # (N,1,28,28)
        node("Conv", ["x", "conv1.weight", "conv1.bias"], ["c1"], kernel_shape=[5, 5], pads=[2, 2, 2, 2]),
        node("MaxPool", ["c1"], ["s2"], **pool),
        node("Relu", ["s2"], ["a2"]),                                                     # (N,6,14,14)
        node("Conv", ["a2", "conv2.weight", "conv2.bias"], ["c3"], kernel_shape=[5, 5]),
        node("MaxPool", ["c3"], ["s4"], **pool),
        node("Relu", ["s4"], ["a4"]),                                                     # (N,16,5,5)
        node("Flatten", ["a4"], ["flat"], axis=1),                                        # (N,400)
        node("Gemm", ["flat", "fc1.weight", "fc1.bias"], ["f5"], transB=1),
        node("Relu", ["f5"], ["a5"]),
        node("Gemm", ["a5", "fc2.weight", "fc2.bias"], ["f6"], transB=1),
        node("Relu", ["f6"], ["a6"]),
        node("Gemm", ["a6", "fc3.weight", "fc3.bias"], ["logits"], transB=1),
        node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "lenet5",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10]),
         helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 10])],
        initializer=inits)
    graph.doc_string = "raw 28x28 MNIST pixels (0..255, float32) in; logits and class probabilities out"
    model = helper.make_model(graph, producer_name="lenet-dist", opset_imports=[helper.make_opsetid("", OPSET)],
                              doc_string=doc)
    model.ir_version = IR_VERSION
    if step is not None:
        helper.set_model_props(model, {"step": str(step)})
    onnx.checker.check_model(model, full_check=True)
    return model


def to_bytes(params, **kw):
    return build(params, **kw).SerializeToString()
