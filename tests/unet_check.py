"""Checks compiled UNets with onnxruntime and (float32 ones) OpenVINO (CPU,
f32) against tomesd's reference outputs.

Usage: python3 unet_check.py MANIFEST, one case per line: MODEL NPZ CONFIG
[REFS]. Feeds each graph input from NPZ's `{input}_b1` and `{input}_b2` (cast
to the input's declared type) and compares the first output with
`out_{CONFIG}_b1` and `_b2` (from REFS when given, else NPZ): max |y - ref| / max |ref| per image must be <= 1e-4 (the spec's
tolerance). Prints one line per runtime, case and batch; exits 1 if any fails.
"""
import sys

import numpy as np
import onnx
import onnxruntime as ort
import openvino as ov

TYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(float16)": np.float16}
failed = 0
for line in open(sys.argv[1]):
    model, npz, config, *refs = line.split()
    onnx.checker.check_model(onnx.load(model), full_check=True)
    data = np.load(npz)
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    float32 = all(i.type != "tensor(float16)" for i in sess.get_inputs())
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"}) if float32 else None
    for batch in ("b1", "b2"):
        feeds = {i.name: data[f"{i.name}_{batch}"].astype(TYPES[i.type]) for i in sess.get_inputs()}
        runs = [("ort", sess.run(None, feeds)[0])]
        if compiled is not None:
            runs.append(("ov", np.asarray(compiled(feeds)[compiled.output(0)])))
        ref = (np.load(refs[0]) if refs else data)[f"out_{config}_{batch}"]
        for runtime, y in runs:
            y = y.astype(np.float32)
            err = max(float(np.abs(y[k] - ref[k]).max() / np.abs(ref[k]).max()) for k in range(len(ref)))
            ok = err <= 1e-4
            failed += not ok
            print(f"{'ok' if ok else 'FAIL'} {runtime} {model} {config} {batch} rel {err:.2e}")
sys.exit(1 if failed else 0)
