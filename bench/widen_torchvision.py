"""The torchvision_vit fixture's graph at ViT-B/16's widths, for timing
torchvision's sequence-first form where no full-size export is at hand.

Usage: python3 bench/widen_torchvision.py OUT.onnx

Width 64 -> 768, 2 heads -> 12 (the five head-count constants of each
attention and the embedding's width), random weights; the fixture's 6
blocks and 10 classes stay. Only for timing: its outputs mean nothing.
"""
import os
import sys

import numpy as np
import onnx
from onnx import numpy_helper

HERE = os.path.dirname(os.path.abspath(__file__))
WIDTHS = {64: 768, 192: 3 * 768, 256: 4 * 768}
HEADS = {"Constant_3_output_0", "Constant_18_output_0", "Constant_22_output_0", "Constant_23_output_0", "Constant_24_output_0"}

m = onnx.load(os.path.join(HERE, "..", "fixtures", "torchvision_vit", "model.onnx"))
rng = np.random.RandomState(0)
for k, init in enumerate(m.graph.initializer):
    shape = [WIDTHS.get(d, d) for d in init.dims]
    w = rng.randn(*shape).astype(np.float32) * 0.02
    if init.name.endswith("weight") and ".ln" in init.name:
        w += 1
    m.graph.initializer[k].CopyFrom(numpy_helper.from_array(w, init.name))


def set_constant(node, value):
    old = numpy_helper.to_array(node.attribute[0].t)
    node.attribute[0].t.CopyFrom(numpy_helper.from_array(np.full_like(old, value)))


for node in m.graph.node:
    if node.op_type != "Constant":
        continue
    if "/self_attention/" in node.output[0] and node.output[0].split("/")[-1] in HEADS:
        set_constant(node, 12)
    elif node.output[0] == "/Constant_7_output_0":  # the patch embedding's width
        set_constant(node, 768)
del m.graph.value_info[:]
onnx.save(m, sys.argv[1])
