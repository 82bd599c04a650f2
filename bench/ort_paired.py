"""Paired onnxruntime timings of a few graphs: each against the first.

Usage: python3 bench/ort_paired.py BATCH RUNS first.onnx other.onnx ...
[--plugin target/release/libtome_ort_ops.so] [--threads 2] [--bias-gelu]

Models take turns as in perf_table.py (an untimed run, then up to four
timed runs each); prints each model's median and the median of first /
this over the paired runs with its 95% bootstrap interval (> 1: this one
is faster), and each output's largest difference from the first's.
onnxruntime's BiasGelu fusion is off (as in perf_table.py: whether its
kernel beats the Add and Gelu it fuses depends on the model and machine,
and it is made only where shapes are known) unless --bias-gelu.
"""
import argparse
import time

import numpy as np
import onnxruntime as ort

p = argparse.ArgumentParser()
p.add_argument("batch", type=int)
p.add_argument("runs", type=int)
p.add_argument("models", nargs="+")
p.add_argument("--plugin", default="target/release/libtome_ort_ops.so")
p.add_argument("--threads", type=int, default=2)
p.add_argument("--bias-gelu", action="store_true", help="leave onnxruntime's BiasGelu fusion on")
args = p.parse_args()
so = ort.SessionOptions()
so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = args.threads, 1, 3
so.register_custom_ops_library(args.plugin)
disabled = [] if args.bias_gelu else ["BiasGeluFusion"]
sessions = [ort.InferenceSession(m, so, providers=["CPUExecutionProvider"], disabled_optimizers=disabled) for m in args.models]
x = np.random.RandomState(0).randn(args.batch, *sessions[0].get_inputs()[0].shape[1:]).astype(np.float32)
feed = [{s.get_inputs()[0].name: x} for s in sessions]
outs = [s.run(None, f)[0] for s, f in zip(sessions, feed)]
times = np.zeros((args.runs, len(sessions)))
for turn in range(-(-args.runs // 4)):
    for k in [(turn + j) % len(sessions) for j in range(len(sessions))]:
        sessions[k].run(None, feed[k])
        for i in range(turn * 4, min(args.runs, turn * 4 + 4)):
            start = time.perf_counter()
            sessions[k].run(None, feed[k])
            times[i, k] = (time.perf_counter() - start) * 1000
rng = np.random.RandomState(0)
for k, m in enumerate(args.models):
    ratios = times[:, 0] / times[:, k]
    boot = [np.median(rng.choice(ratios, len(ratios))) for _ in range(2000)]
    print(f"{m}: median {np.median(times[:, k]):.2f} ms, first / this {np.median(ratios):.3f} "
          f"({np.percentile(boot, 2.5):.3f}-{np.percentile(boot, 97.5):.3f}), max |y - first| {np.abs(outs[k] - outs[0]).max():.1e}")
