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


def merge_model(r, n, c, metric_shape, log_size=False, **attributes):
    """x [1,n,c], keys (rank 4, or 5 stacked) or scores (rank 3) of `metric_shape` ->
    BipartiteMerge(r, **attributes), with its optional third output
    log(size) when `log_size`."""
    outputs = ["y", "size"] + ["log_size"] * log_size
    node = helper.make_node("BipartiteMerge", ["x", "metric"], outputs, domain="ai.tome", r=r, **attributes)
    graph = helper.make_graph(
        [node], "merge",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n, c]),
         helper.make_tensor_value_info("metric", TensorProto.FLOAT, metric_shape)],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs])
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
    ("r above half the tokens", merge_model(4, 6, 3, [1, 2, 6, 4], keys_transposed=0),
     {"x": rng.standard_normal((1, 6, 3), np.float32), "metric": rng.standard_normal((1, 2, 6, 4), np.float32)},
     ["r=4", "more than half"]),
    ("keys of other tokens than x", merge_model(1, 6, 3, [1, 2, 4, 5], keys_transposed=1),
     {"x": rng.standard_normal((1, 6, 3), np.float32), "metric": rng.standard_normal((1, 2, 4, 5), np.float32)},
     ["keys"]),
    ("stacked keys transposed", merge_model(1, 6, 3, [2, 1, 2, 4, 6], keys_transposed=1),
     {"x": rng.standard_normal((1, 6, 3), np.float32), "metric": rng.standard_normal((2, 1, 2, 4, 6), np.float32)},
     ["keys"]),
    ("log_size_rows neither 0 nor 1", merge_model(1, 6, 3, [1, 2, 6, 4], log_size=True, log_size_rows=2),
     {"x": rng.standard_normal((1, 6, 3), np.float32), "metric": rng.standard_normal((1, 2, 6, 4), np.float32)},
     ["log_size_rows"]),
    ("scores of the wrong shape", merge_model(1, 6, 3, [1, 3, 2]),
     {"x": rng.standard_normal((1, 6, 3), np.float32), "metric": rng.standard_normal((1, 3, 2), np.float32)},
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
# Well-formed nodes still run, keys in either layout or scores given, and
# agree: the refusals above are not a broken library. Scores from the keys
# as ToMe takes them (mean over heads, L2-normalised, even by odd tokens).
x = rng.standard_normal((1, 6, 3), np.float32)
keys = rng.standard_normal((1, 2, 6, 4), np.float32)
metric = keys.mean(1)
metric /= np.linalg.norm(metric, axis=-1, keepdims=True)
scores = metric[:, ::2] @ metric[:, 1::2].transpose(0, 2, 1)
forms = [("keys", merge_model(2, 6, 3, [1, 2, 6, 4]), keys),
         ("keys transposed", merge_model(2, 6, 3, [1, 2, 4, 6], keys_transposed=1), keys.transpose(0, 1, 3, 2).copy()),
         ("keys stacked first (onnxruntime Attention's present)", merge_model(2, 6, 3, [2, 1, 2, 6, 4]),
          np.stack([keys, rng.standard_normal(keys.shape, np.float32)])),
         ("scores", merge_model(2, 6, 3, [1, 3, 3]), scores.astype(np.float32))]
for runtime, run in [("ort", run_ort), ("ov", run_ov)]:
    outs = [run(model, {"x": x, "metric": m}) for _, model, m in forms]
    for (what, _, _), y in zip(forms, outs):
        ok = y[0].shape == (1, 4, 3) and y[1].shape == (1, 4, 1) and float(y[1].sum()) == 6.0
        ok = ok and np.allclose(y[0], outs[-1][0], rtol=0, atol=1e-6) and np.array_equal(y[1], outs[-1][1])
        failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {runtime:3s} a valid merge from {what}: shapes {y[0].shape}, {y[1].shape}")
    # The third output, where the node has it: the sizes' natural logs,
    # the other two as without it.
    y = run(merge_model(2, 6, 3, [1, 2, 6, 4], log_size=True), {"x": x, "metric": keys})
    ok = len(y) == 3 and y[2].shape == (1, 4, 1) and np.allclose(y[2], np.log(y[1]), rtol=1e-6, atol=0)
    ok = ok and float(y[2].max()) > 0.69 and all(np.array_equal(a, b) for a, b in zip(y[:2], outs[0]))
    failed += not ok
    print(f"{'ok  ' if ok else 'FAIL'} {runtime:3s} log(size) as the third output: {[v.ravel().tolist() for v in y[1:]]}")
    # Spread over query rows (log_size_rows=1): [1,1,4,4], every row the logs.
    y = run(merge_model(2, 6, 3, [1, 2, 6, 4], log_size=True, log_size_rows=1), {"x": x, "metric": keys})
    ok = len(y) == 3 and y[2].shape == (1, 1, 4, 4) and all(np.array_equal(row, np.log(y[1][0, :, 0])) for row in y[2][0, 0])
    ok = ok and all(np.array_equal(a, b) for a, b in zip(y[:2], outs[0]))
    failed += not ok
    print(f"{'ok  ' if ok else 'FAIL'} {runtime:3s} log(size) spread over rows: shape {y[2].shape}")
sys.exit(1 if failed else 0)
