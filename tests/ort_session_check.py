"""onnxruntime's own graph optimizations on compiled ViTs: the fusions its
session makes where it knows tensor shapes (BiasGelu) must reach past every
merge as on the original, and the outputs must match the reference.

Usage: python3 ort_session_check.py LIBTOME_ORT_OPS NPZ KEY ORIGINAL COMPILED...
Prints each model's BiasGelu count after onnxruntime's session optimizations
(and each compiled model's relative error against KEY); exits 1 unless every
compiled model has the original's count and matches KEY within 1e-4
relative per image.
"""
import os
import sys
import tempfile

import numpy as np
import onnx
import onnxruntime as ort

lib, npz, key, original, *compiled = sys.argv[1:]
data = np.load(npz)
ok = True


def fused(path):
    """BiasGelu nodes in the session-optimized graph, and the session."""
    so = ort.SessionOptions()
    so.log_severity_level = 3  # it warns that an optimized graph is for this machine
    so.register_custom_ops_library(lib)
    with tempfile.TemporaryDirectory() as d:
        so.optimized_model_filepath = os.path.join(d, "optimized.onnx")
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        graph = onnx.load(so.optimized_model_filepath, load_external_data=False).graph
    return sum(n.op_type == "BiasGelu" for n in graph.node), sess


want, _ = fused(original)
print(f"{original}: {want} BiasGelu")
for path in compiled:
    count, sess = fused(path)
    y = sess.run(None, {sess.get_inputs()[0].name: data["pixel_values"]})[0]
    ref = data[key]
    err = max(float(np.abs(y[i] - ref[i]).max() / np.abs(ref[i]).max()) for i in range(len(ref)))
    print(f"{path}: {count} BiasGelu, relative error {err:.2e}")
    ok &= count == want and want > 0 and err <= 1e-4
sys.exit(0 if ok else 1)
