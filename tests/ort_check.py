"""Checks compiled models outside the project: onnx.checker (full check) and
onnxruntime's outputs against the reference logits.

Usage: python3 ort_check.py MANIFEST, one case per line: MODEL NPZ KEY PIXELS [TOL],
KEY being a reference in NPZ compared with the first output, or KEY@OUTPUT
with the output named OUTPUT, or KEY@OUTPUT#T with its token T (axis 1);
PIXELS being the .npz whose `pixel_values` are the inputs (cast to the
model's input type), TOL a relative tolerance replacing the spec's (used for
float16 models, whose own arithmetic moves the float32 references).
Prints one line per case; exits 1 if any case fails the spec's tolerance
(max |y - ref| / max |ref| <= 1e-4 per image; 1e-5 absolute for logits_r0).
"""
import sys

import numpy as np
import onnx
import onnxruntime as ort

failed = 0
for line in open(sys.argv[1]):
    model, npz, key, pixels, *tol = line.split()
    onnx.checker.check_model(onnx.load(model), full_check=True)
    data = np.load(npz)
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    inputs = np.load(pixels)
    name = sess.get_inputs()[0].name
    x = inputs[name] if name in inputs else inputs["pixel_values"]
    x = x.astype(np.float16) if sess.get_inputs()[0].type == "tensor(float16)" else x
    key, _, output = key.partition("@")
    output, _, token = output.partition("#")
    names = [o.name for o in sess.get_outputs()]
    y = sess.run(None, {sess.get_inputs()[0].name: x})[names.index(output) if output else 0].astype(np.float32)
    if token:
        y = y[:, int(token)]
    ref = data[key]
    if tol:
        rel = [float(np.abs(y[i] - ref[i]).max() / np.abs(ref[i]).max()) for i in range(len(ref))]
        err, ok = max(rel), max(rel) <= float(tol[0])
    elif key == "logits_r0":
        err, ok = float(np.abs(y - ref).max()), float(np.abs(y - ref).max()) <= 1e-5
    else:
        rel = [float(np.abs(y[i] - ref[i]).max() / np.abs(ref[i]).max()) for i in range(len(ref))]
        err, ok = max(rel), max(rel) <= 1e-4
    failed += not ok
    print(f"{'ok  ' if ok else 'FAIL'} {model} {key} {err:.3e}")
sys.exit(1 if failed else 0)
