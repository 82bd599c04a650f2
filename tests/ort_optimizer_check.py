"""onnxruntime's transformers optimizer on a compiled ViT: its fusions and its numbers.

Usage: python3 ort_optimizer_check.py COMPILED HEADS WIDTH NPZ KEY BLOCKS
Runs `optimize_model(COMPILED, model_type="vit", opt_level=0)` and prints the
fused op counts; exits 1 unless there is one SkipLayerNormalization per block
(the MLP residual's; the attention residual's LayerNorm reads the merged
stream) and the optimized model's outputs on NPZ's pixel_values match KEY
within 1e-4 relative per image.
"""
import collections
import sys

import numpy as np
import onnxruntime as ort
from onnxruntime.transformers.optimizer import optimize_model

path, heads, width, npz, key, blocks = sys.argv[1:]
model = optimize_model(path, model_type="vit", num_heads=int(heads), hidden_size=int(width), opt_level=0)
ops = collections.Counter(n.op_type for n in model.model.graph.node)
print({k: ops[k] for k in ("SkipLayerNormalization", "LayerNormalization", "BiasGelu")})
data = np.load(npz)
sess = ort.InferenceSession(model.model.SerializeToString(), providers=["CPUExecutionProvider"])
y = sess.run(None, {sess.get_inputs()[0].name: data["pixel_values"]})[0]
ref = data[key]
err = max(float(np.abs(y[i] - ref[i]).max() / np.abs(ref[i]).max()) for i in range(len(ref)))
print(f"relative error {err:.2e}")
sys.exit(0 if ops["SkipLayerNormalization"] == int(blocks) and err <= 1e-4 else 1)
