"""Recomputes a `tune` metric outside the project, with onnxruntime.

Usage: python3 tune_check.py ORIGINAL COMPILED PIXELS.npy METRIC [LABEL...]
PIXELS holds the preprocessed images [n, 3, H, W] (float32). Runs both
models one image at a time and prints the drop in points: for agreement
100 x (1 - share of equal top-1), for cosine 100 x (1 - mean cosine), for
accuracy the original's accuracy minus the compiled model's (labels given).
"""
import sys

import numpy as np
import onnxruntime as ort


def outputs(path, pixels):
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return np.stack([sess.run(None, {name: x[None]})[0][0].astype(np.float64).ravel() for x in pixels])


original, compiled, pixels, metric, *labels = sys.argv[1:]
x = np.load(pixels)
a, b = outputs(original, x), outputs(compiled, x)
if metric == "cosine":
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    drop = 100 * (1 - cos.mean())
elif metric == "agreement":
    drop = 100 * (1 - (a.argmax(1) == b.argmax(1)).mean())
else:
    y = np.array([int(v) for v in labels])
    drop = 100 * ((a.argmax(1) == y).mean() - (b.argmax(1) == y).mean())
print(f"{drop:.9f}")
