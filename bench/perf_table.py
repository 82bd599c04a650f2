"""The whole performance table of issue 5 from one command: tract and
onnxruntime, original vs compiled (--r 16), every ratio measured in one run.

Usage:
    python3 bench/perf_table.py [--tome target/release/tome-compile]
        [--bench-dir /work/bench] [--threads 2] [--iters 10] [--quick]

Weights of the full-size graphs in ../shared/fixtures/bench are filled into
--bench-dir with ../shared/tools/fill_weights.py when missing. Needs numpy,
onnx and onnxruntime. Timings are medians of runs in turns: each model in
turn runs once untimed, then up to four timed runs in a row, so its weights
are in cache as far as they fit (as for a deployed model), and the machine's
drift hits every model alike.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnxruntime as ort

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.normpath(os.path.join(HERE, "..", "..", "shared"))

p = argparse.ArgumentParser()
p.add_argument("--tome", default=os.path.join(HERE, "..", "target", "release", "tome-compile"))
p.add_argument("--bench-dir", default=os.path.join(tempfile.gettempdir(), "tome-bench"))
p.add_argument("--threads", type=int, default=2)
p.add_argument("--iters", type=int, default=10)
p.add_argument("--quick", action="store_true", help="ViT-B/16 batch 1 only")
args = p.parse_args()


def weights(name):
    path = os.path.join(args.bench_dir, name + ".onnx")
    if not os.path.exists(path):
        os.makedirs(args.bench_dir, exist_ok=True)
        src = os.path.join(SHARED, "fixtures", "bench", name + ".onnx")
        subprocess.run([sys.executable, os.path.join(SHARED, "tools", "fill_weights.py"), src, args.bench_dir],
                       check=True, stdout=subprocess.DEVNULL)
    return path


def compile_model(src, label, flags):
    out = src.replace(".onnx", f".r16.{label}.onnx")
    subprocess.run([args.tome, src, "--r", "16", *flags, "-o", out], check=True, stdout=subprocess.DEVNULL)
    return out


def tract(src, batch, iters):
    """tract's medians and ratios, every variant timed in the same turns:
    the --target tract graph (BipartiteMerge and FusedAttention ops), the
    standard-op graph onnxruntime and TensorRT get (portable), the timing
    bound, and the --target tract graph at r = 0 (what its ops alone are worth)."""
    out = subprocess.run([args.tome, "bench", src, "--r", "16", "--batch", str(batch), "--threads",
                          str(args.threads), "--iters", str(iters), "--warmup", "1", "--json",
                          "--also", "portable,bound,r0", "--profile", "3"],
                         check=True, capture_output=True, text=True).stdout
    r = json.loads(out)
    also = {a["variant"]: a["speedup"] for a in r["also"]}
    # Share of the compiled model's profiled time in the matching and merge nodes.
    merge = r["profile"]["merge_ms"] / r["profile"]["total_ms"]
    return r["original"]["median_ms"], r["compiled"]["median_ms"], r["ideal_speedup"], also, merge


RUNS_PER_TURN = 4  # as tome-compile bench


def ort_times(paths, batch, iters):
    """ms of each model's timed runs, [iters, models]. As in `tome-compile
    bench`, models take turns, each an untimed run and then up to four
    timed runs in a row: the timed runs find the model's weights in cache as
    far as they fit, as a deployed model does, and the turns spread the
    machine's drift over every model alike."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3  # the paper export's dynamic shapes warn on every run
    sessions = [ort.InferenceSession(p, so, providers=["CPUExecutionProvider"]) for p in paths]
    shape = [batch] + [d for d in sessions[0].get_inputs()[0].shape[1:]]
    x = np.random.RandomState(0).randn(*shape).astype(np.float32)
    times = np.zeros((iters, len(sessions)))
    for turn in range(-(-iters // RUNS_PER_TURN)):
        for k in [(turn + j) % len(sessions) for j in range(len(sessions))]:
            s = sessions[k]
            s.run(None, {s.get_inputs()[0].name: x})
            for i in range(turn * RUNS_PER_TURN, min(iters, (turn + 1) * RUNS_PER_TURN)):
                start = time.perf_counter()
                s.run(None, {s.get_inputs()[0].name: x})
                times[i, k] = (time.perf_counter() - start) * 1000
    return times


def paired(slower, faster):
    """Median of slower / faster over their timed runs paired in order (the
    i-th run of each in the same turn), with a 95% bootstrap interval: the
    difference between two close graphs, free of the drift between turns
    that medians alone carry."""
    ratios = slower / faster
    rng = np.random.RandomState(0)
    boot = [np.median(rng.choice(ratios, len(ratios))) for _ in range(2000)]
    return float(np.median(ratios)), float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))


rows = []
cases = [("vit_base_patch16_224", 1)]
if not args.quick:
    cases += [("vit_base_patch16_224", 8), ("vit_small_patch16_224", 1), ("vit_small_patch16_224", 8),
              ("vit_large_patch16_384", 1)]
for name, batch in cases:
    src = weights(name)
    default = compile_model(src, "portable", ["--target", "portable"])
    trt = compile_model(src, "tensorrt", ["--target", "tensorrt"])
    # The timing bound: r tokens dropped per block, not merged (wrong outputs).
    bound = compile_model(src, "bound", ["--bound", "--verify", "off"])
    iters = max(3, args.iters // (4 if "large" in name else 1) // (2 if batch > 1 else 1))
    t_orig, t_comp, ideal, also, merge_share = tract(src, batch, iters)
    tract_portable, tract_bound, tract_r0 = also["portable"], also["bound"], also["r0"]
    models = [src, default, trt, bound]
    paper = os.path.join(args.bench_dir, "paper_tome_r16_" + name + ".onnx")
    if name == "vit_base_patch16_224":
        weights("paper_tome_r16_" + name)
        models.append(paper)
    # Paired ratios want more runs than medians: each is cheap here.
    times = ort_times(models, batch, iters * 3 if len(models) > 4 else iters)
    o = [float(m) for m in np.median(times, axis=0)]
    row = {"model": name, "batch": batch, "ideal": ideal,
           "tract_orig_ms": t_orig, "tract_comp_ms": t_comp, "tract_speedup": t_orig / t_comp,
           "ort_orig_ms": o[0], "ort_comp_ms": o[1], "ort_speedup": o[0] / o[1],
           "ort_trt_target_vs_default": o[1] / o[2],
           "tract_portable_speedup": tract_portable, "tract_merge_share": merge_share,
           "tract_bound_speedup": tract_bound, "tract_r0_speedup": tract_r0, "ort_bound_speedup": o[0] / o[3],
           "paper_ort_speedup": o[0] / o[4] if len(o) > 4 else None,
           "paper_vs_r16_ort_paired": paired(times[:, 4], times[:, 1]) if len(o) > 4 else None,
           "tract_comp_vs_ort_orig": o[0] / t_comp}
    rows.append(row)
    print(json.dumps(row), file=sys.stderr, flush=True)

print(f"threads {args.threads}; medians of runs in turns (one untimed, then up to {RUNS_PER_TURN} timed, per model per turn); "
      "speedup = original / compiled on the same runtime")
print("bound = the same token counts with tokens dropped, not merged: no merging cost, the best any ToMe graph can do")
print("paper export ms / r16 ms = the paper export's time over ours, runs paired within turns (> 1: ours is faster); "
      "median, 95% bootstrap interval")
print("tract r16 = the --target tract graph; tract portable = the standard-op graph (what ort and TensorRT get) in tract; "
      "tract r0 = the --target tract graph with nothing merged (its fused ops alone); "
      "merge = the matching and merge nodes' share of tract's per-node profile")
print("| model | batch | ideal (MACs) | tract orig ms | tract r16 ms | tract r16 | tract portable | tract bound | tract r0 | merge, tract "
      "| ort orig ms | ort r16 ms | ort r16 | ort bound | paper export, ort | paper export ms / r16 ms, ort (paired, 95% CI) "
      "| tensorrt target vs default, ort "
      "| tract r16 vs ort orig |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    paper = f"{r['paper_ort_speedup']:.2f}x" if r["paper_ort_speedup"] else "-"
    p = r["paper_vs_r16_ort_paired"]
    paper_paired = f"{p[0]:.3f} ({p[1]:.3f}-{p[2]:.3f})" if p else "-"
    print(f"| {r['model']} | {r['batch']} | {r['ideal']:.2f}x | {r['tract_orig_ms']:.1f} | {r['tract_comp_ms']:.1f} "
          f"| {r['tract_speedup']:.2f}x | {r['tract_portable_speedup']:.2f}x | {r['tract_bound_speedup']:.2f}x | {r['tract_r0_speedup']:.2f}x "
          f"| {100 * r['tract_merge_share']:.1f}% | {r['ort_orig_ms']:.1f} | {r['ort_comp_ms']:.1f} "
          f"| {r['ort_speedup']:.2f}x | {r['ort_bound_speedup']:.2f}x "
          f"| {paper} | {paper_paired} | {r['ort_trt_target_vs_default']:.2f}x | {r['tract_comp_vs_ort_orig']:.2f}x |")
