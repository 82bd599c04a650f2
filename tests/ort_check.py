"""Checks compiled models outside the project: onnx.checker (full check),
then onnxruntime's and OpenVINO's (CPU, f32) outputs against the reference
logits, each within the same tolerance.

Usage: python3 ort_check.py MANIFEST, one case per line: MODEL NPZ KEY PIXELS [TOL],
KEY being a reference in NPZ compared with the first output, or KEY@OUTPUT
with the output named OUTPUT, or KEY@OUTPUT#T with its token T (axis 1);
PIXELS being the .npz whose `pixel_values` are the inputs (cast to the
model's input type), TOL a relative tolerance replacing the spec's (used for
float16 models, whose own arithmetic moves the float32 references).
Prints one line per case and runtime; exits 1 if any fails the spec's tolerance
(max |y - ref| / max |ref| <= 1e-4 per image; 1e-5 absolute for logits_r0).
OpenVINO runs every float32 model (float16 ones run in onnxruntime only:
OpenVINO computes them in float32 and misses the float16 references' rounding).
The plugins named by TOME_ORT_OPS and TOME_OV_OPS (libtome_ort_ops,
libtome_ov_ops) are loaded into both, so that `--target onnxruntime-ops`
graphs run; a graph with a `BipartiteMerge` node must have them.
"""
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
import openvino as ov

core = ov.Core()
if os.environ.get("TOME_OV_OPS"):
    core.add_extension(os.environ["TOME_OV_OPS"])
options = ort.SessionOptions()
if os.environ.get("TOME_ORT_OPS"):
    options.register_custom_ops_library(os.environ["TOME_ORT_OPS"])


def openvino_output(model, x, output):
    """The model's output `output` (or its first) from OpenVINO on CPU in f32."""
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": 1})
    port = next(o for o in compiled.outputs if output in o.get_names()) if output else compiled.output(0)
    return np.asarray(compiled(x)[port]).astype(np.float32)


def error(y, ref, key, tol):
    """(error, within the tolerance)."""
    if not tol and key == "logits_r0":
        err = float(np.abs(y - ref).max())
        return err, err <= 1e-5
    err = max(float(np.abs(y[i] - ref[i]).max() / np.abs(ref[i]).max()) for i in range(len(ref)))
    return err, err <= (float(tol[0]) if tol else 1e-4)


failed = 0
for line in open(sys.argv[1]):
    model, npz, key, pixels, *tol = line.split()
    onnx.checker.check_model(onnx.load(model), full_check=True)
    data = np.load(npz)
    sess = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    inputs = np.load(pixels)
    name = sess.get_inputs()[0].name
    x = inputs[name] if name in inputs else inputs["pixel_values"]
    x = x.astype(np.float16) if sess.get_inputs()[0].type == "tensor(float16)" else x
    key, _, output = key.partition("@")
    output, _, token = output.partition("#")
    names = [o.name for o in sess.get_outputs()]
    y = sess.run(None, {sess.get_inputs()[0].name: x})[names.index(output) if output else 0].astype(np.float32)
    runs = [("ort", y)]
    if sess.get_inputs()[0].type == "tensor(float)":
        runs.append(("ov", openvino_output(model, x, output)))
    ref = data[key]
    for runtime, y in runs:
        y = y[:, int(token)] if token else y
        err, ok = error(y, ref, key, tol)
        failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {runtime:3s} {model} {key} {err:.3e}")
sys.exit(1 if failed else 0)
