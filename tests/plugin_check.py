"""Error paths of tome-compile's runtime plugins: a BipartiteMerge node given
inputs it cannot merge must fail in onnxruntime and in OpenVINO with a
message naming what is wrong, never crash or return garbage.

Usage: python3 plugin_check.py LIBTOME_ORT_OPS LIBTOME_OV_OPS; prints one
line per case and runtime, exits 1 if any case is not refused as expected.
"""
import sys

import numpy as np
import onnx
import onnxruntime as ort
import openvino as ov
from onnx import TensorProto, helper

ort_lib, ov_lib = sys.argv[1], sys.argv[2]


def merge_model(r, n, c, scores_shape, prefix=0):
    """x [1,n,c], scores of `scores_shape` -> BipartiteMerge(r, prefix)."""
    node = helper.make_node("BipartiteMerge", ["x", "scores"], ["y", "size"], domain="ai.tome", r=r, prefix=prefix)
    graph = helper.make_graph(
        [node], "merge",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n, c]),
         helper.make_tensor_value_info("scores", TensorProto.FLOAT, scores_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("size", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.tome", 1)])
    model.ir_version = 8
    return model.SerializeToString()


def run_ort(model, feeds):
    so = ort.SessionOptions()
    so.register_custom_ops_library(ort_lib)
    sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def run_ov(model, feeds):
    core = ov.Core()
    core.add_extension(ov_lib)
    compiled = core.compile_model(core.read_model(model, b""), "CPU")
    return [np.asarray(v) for v in compiled(feeds).values()]


rng = np.random.default_rng(0)
cases = [
    # (what, model, feeds, words the message must hold)
    ("r above half the tokens", merge_model(4, 6, 3, [1, 3, 3]),
     {"x": rng.standard_normal((1, 6, 3), np.float32), "scores": rng.standard_normal((1, 3, 3), np.float32)},
     ["r=4", "more than half"]),
    ("scores of the wrong shape", merge_model(1, 6, 3, [1, 3, 2]),
     {"x": rng.standard_normal((1, 6, 3), np.float32), "scores": rng.standard_normal((1, 3, 2), np.float32)},
     ["scores"]),
]
failed = 0
for what, model, feeds, words in cases:
    for runtime, run in [("ort", run_ort), ("ov", run_ov)]:
        try:
            run(model, feeds)
            message = None
        except Exception as e:  # both runtimes raise their own types
            message = str(e)
        ok = message is not None and all(w in message for w in words)
        failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {runtime:3s} {what}: {message!r}")
# A well-formed node still runs: the refusals above are not a broken library.
good = {"x": rng.standard_normal((1, 6, 3), np.float32), "scores": rng.standard_normal((1, 3, 3), np.float32)}
for runtime, run in [("ort", run_ort), ("ov", run_ov)]:
    y = run(merge_model(2, 6, 3, [1, 3, 3]), good)
    ok = y[0].shape == (1, 4, 3) and y[1].shape == (1, 4, 1) and float(y[1].sum()) == 6.0
    failed += not ok
    print(f"{'ok  ' if ok else 'FAIL'} {runtime:3s} a valid merge: shapes {y[0].shape}, {y[1].shape}, sizes sum {float(y[1].sum())}")
sys.exit(1 if failed else 0)
