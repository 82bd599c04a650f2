"""The whole performance table from one command: tract, onnxruntime (as
exported, and after its transformers optimizer) and OpenVINO (f32 and its
default precision), original vs compiled (--r 16), every ratio measured in
one run.

Usage:
    python3 bench/perf_table.py [--tome target/release/tome-compile]
        [--bench-dir /work/bench] [--threads 2] [--iters 10] [--quick]
        [--runtimes tract,ort,ortopt,openvino] [--cases vit_large_patch16_384:8,...]
    python3 bench/perf_table.py --from-json ROWS.jsonl   (the table of a run's stderr)

OpenVINO rows need the `openvino` package (skipped, and said, without it).
onnxruntime's "r16" is the `--target onnxruntime` graph (its own
`Attention` op), OpenVINO's the standard-op graph. The "ops" columns time
`--target onnxruntime-ops` and `openvino-ops` with tome-compile's plugins
loaded (`cargo build --release -p tome-onnxruntime-ops -p
tome-openvino-ops`; skipped, and said, without them). onnxruntime runs
every graph without its BiasGelu fusion (NO_BIAS_GELU, below), and the
original with it too.

Weights of the full-size graphs in ../shared/fixtures/bench are filled into
--bench-dir with ../shared/tools/fill_weights.py when missing. Needs numpy,
onnx and onnxruntime. Timings are medians of runs in turns: each model in
turn runs once untimed, then up to four timed runs in a row, so its weights
are in cache as far as they fit (as for a deployed model), and the machine's
drift hits every model alike.
"""
import argparse
import json
import multiprocessing
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
p.add_argument("--cases", help="model:batch pairs to measure, comma-separated (default: every model at batch 1 and 8)")
p.add_argument("--runtimes", default="tract,ort,ortopt,openvino", help="which runtimes' columns to measure")
p.add_argument("--ov-static-batch", action="store_true",
               help="OpenVINO: fix each graph's batch before compiling it (README: give OpenVINO a static batch)")
p.add_argument("--from-json", metavar="FILE",
               help="measure nothing: print the table of the rows a run wrote to stderr (one JSON object a line; "
                    "a run stopped part way keeps the rows it finished)")
p.add_argument("--plugins", default=os.path.join(HERE, "..", "target", "release"),
               help="directory with libtome_ort_ops.so and libtome_ov_ops.so")
args = p.parse_args()
ORT_OPS, OV_OPS = (os.path.join(args.plugins, f) for f in ("libtome_ort_ops.so", "libtome_ov_ops.so"))
HAS_OPS = os.path.exists(ORT_OPS) and os.path.exists(OV_OPS)
if not HAS_OPS:
    print(f"no plugins in {args.plugins}: no ops columns (cargo build --release -p tome-onnxruntime-ops "
          "-p tome-openvino-ops)", file=sys.stderr)
RUNTIMES = set(args.runtimes.split(","))
# Heads and width of each bench graph, for onnxruntime's optimizer.
ARCH = {"vit_small_patch16_224": (6, 384), "vit_base_patch16_224": (12, 768), "vit_large_patch16_384": (16, 1024)}


def weights(name):
    path = os.path.join(args.bench_dir, name + ".onnx")
    if not os.path.exists(path):
        os.makedirs(args.bench_dir, exist_ok=True)
        # The paper exports of ViT-S and ViT-L ship here (gen_paper_exports.py); the rest in ../shared.
        src = os.path.join(HERE, name + ".onnx")
        if not os.path.exists(src):
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
    # bench runs every model's i-th timed run in the same turn: pairs.
    bound = next(a["timing"]["runs_ms"] for a in r["also"] if a["variant"] == "bound")
    vs_bound = paired(np.array(r["compiled"]["runs_ms"]), np.array(bound))
    return r["original"]["median_ms"], r["compiled"]["median_ms"], r["ideal_speedup"], also, merge, vs_bound


RUNS_PER_TURN = 4  # as tome-compile bench


def in_child(stage, *stage_args):
    """`stage(*stage_args)` run in a forked process, its result sent back:
    each runtime's sessions give their memory back to the system when their
    stage ends. In one process onnxruntime's freed weights stay in the heap
    (8 GB after ViT-L/16@384's seven sessions) under OpenVINO's (11 GB more),
    and the run was killed for memory. The parent only imports the runtimes."""
    with multiprocessing.get_context("fork").Pool(1) as pool:
        return pool.apply(stage, stage_args)


# onnxruntime 1.32's CPU BiasGelu kernel is not always faster than the Add
# and Gelu it replaces (the original ViT-B/16 0.8-4.3% faster without it on
# the 2-vCPU Intel Xeon host, ViT-S/16 mixed), and its fusion runs only where
# shapes are known: not in the paper's export, and not past a merge in files
# compiled before commit ce1ff27. Every graph is timed without it, so no ratio
# carries it; the original with it is timed too ("orig, BiasGelu fused").
NO_BIAS_GELU = ["BiasGeluFusion"]


def ort_times(paths, batch, iters, defaults=()):
    """ms of each model's timed runs, [iters, models]. As in `tome-compile
    bench`, models take turns, each an untimed run and then up to four
    timed runs in a row: the timed runs find the model's weights in cache as
    far as they fit, as a deployed model does, and the turns spread the
    machine's drift over every model alike. Models get onnxruntime's graph
    optimizations less NO_BIAS_GELU, those at indices in `defaults` all of
    them."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3  # the paper export's dynamic shapes warn on every run
    if HAS_OPS:
        so.register_custom_ops_library(ORT_OPS)
    sessions = [ort.InferenceSession(p, so, providers=["CPUExecutionProvider"],
                                     disabled_optimizers=[] if k in defaults else NO_BIAS_GELU)
                for k, p in enumerate(paths)]
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


def ort_optimized(path, name):
    """`path` after onnxruntime's transformers optimizer (model_type vit,
    opt_level 0, as its docs advise before onnxruntime's own graph
    optimizations), and its count of SkipLayerNormalization fusions."""
    from onnxruntime.transformers.optimizer import optimize_model
    out = path.replace(".onnx", ".ortopt.onnx")
    heads, width = ARCH[name]
    model = optimize_model(path, model_type="vit", num_heads=heads, hidden_size=width, opt_level=0)
    model.save_model_to_file(out, use_external_data_format=True)
    return out, sum(n.op_type == "SkipLayerNormalization" for n in model.model.graph.node)


def ortopt_times(paths, name, batch, iters):
    """Each graph after onnxruntime's transformers optimizer: its count of
    SkipLayerNormalization fusions, and its times as `ort_times`."""
    optimized = [ort_optimized(path, name) for path in paths]
    return [skips for _, skips in optimized], ort_times([path for path, _ in optimized], batch, iters)


def openvino_times(paths, batch, iters, precision):
    """As `ort_times`, in OpenVINO on CPU at `precision` ("f32", or None for
    its default: bf16 where the CPU has it); also each model's first output."""
    import openvino as ov
    core = ov.Core()
    if HAS_OPS:
        core.add_extension(OV_OPS)
    config = {"INFERENCE_NUM_THREADS": args.threads}
    if precision:
        config["INFERENCE_PRECISION_HINT"] = precision
    def load(path):
        model = core.read_model(path)
        if args.ov_static_batch:  # every graph alike
            model.reshape([batch] + [d.get_length() for d in model.input(0).get_partial_shape()[1:]])
        return core.compile_model(model, "CPU", config)

    models = [load(p) for p in paths]
    shape = [batch] + [d.get_length() for d in models[0].input(0).get_partial_shape()[1:]]
    x = np.random.RandomState(0).randn(*shape).astype(np.float32)
    outputs = [np.asarray(m(x)[0]) for m in models]
    times = np.zeros((iters, len(models)))
    for turn in range(-(-iters // RUNS_PER_TURN)):
        for k in [(turn + j) % len(models) for j in range(len(models))]:
            models[k](x)
            for i in range(turn * RUNS_PER_TURN, min(iters, (turn + 1) * RUNS_PER_TURN)):
                start = time.perf_counter()
                models[k](x)
                times[i, k] = (time.perf_counter() - start) * 1000
    return times, outputs


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
              ("vit_large_patch16_384", 1), ("vit_large_patch16_384", 8)]
if args.cases:
    cases = [(name, int(batch)) for name, batch in (case.split(":") for case in args.cases.split(","))]
if args.from_json:
    with open(args.from_json) as f:
        rows = [json.loads(line) for line in f if line.startswith("{")]
    cases = []
unknown = [name for name, _ in cases if name not in ARCH]
if unknown:
    sys.exit(f"--cases: no bench model {unknown[0]} (have {', '.join(ARCH)})")
for name, batch in cases:
    src = weights(name)
    default = compile_model(src, "portable", ["--target", "portable"])
    # The timing bound: r tokens dropped per block, not merged (wrong outputs);
    # for onnxruntime in its --target onnxruntime form (its Attention op).
    bound = compile_model(src, "bound", ["--bound", "--verify", "off"])
    ort_r16 = compile_model(src, "ort", ["--target", "onnxruntime"])
    ort_bound = compile_model(src, "ortbound", ["--bound", "--target", "onnxruntime", "--verify", "off"])
    iters = max(3, args.iters // (4 if "large" in name else 1) // (2 if batch > 1 else 1))
    row = {"model": name, "batch": batch}
    # Paired ratios want more runs than medians: each is cheap here.
    runs = iters * 3
    if "tract" in RUNTIMES:
        t_orig, t_comp, ideal, also, merge_share, vs_bound = tract(src, batch, runs)
        row.update({"ideal": ideal, "tract_orig_ms": t_orig, "tract_comp_ms": t_comp, "tract_speedup": t_orig / t_comp,
                    "tract_portable_speedup": also["portable"], "tract_merge_share": merge_share,
                    "tract_r16_vs_bound_paired": vs_bound,
                    "tract_bound_speedup": also["bound"], "tract_r0_speedup": also["r0"]})
    paper = os.path.join(args.bench_dir, "paper_tome_r16_" + name + ".onnx")
    weights("paper_tome_r16_" + name)
    # onnxruntime: original, --target onnxruntime, the standard-op graph, bound, paper (, onnxruntime-ops);
    # OpenVINO: original, the standard-op graph, bound, paper (, openvino-ops, its bound).
    models = [src, ort_r16, default, ort_bound, paper, src]
    ov_models = [src, default, bound, paper]
    if HAS_OPS:
        models.append(compile_model(src, "ops", ["--target", "onnxruntime-ops"]))
        # Its bound in the same form (--target openvino-ops scales Q·Kᵀ after its MatMul).
        ov_models += [compile_model(src, "ovops", ["--target", "openvino-ops"]),
                      compile_model(src, "ovbound", ["--bound", "--target", "openvino-ops", "--verify", "off"])]
    if "ort" in RUNTIMES:
        times = in_child(ort_times, models, batch, runs, (5,))
        o = [float(m) for m in np.median(times, axis=0)]
        row.update({"ort_orig_fused_paired": paired(times[:, 5], times[:, 0]), "ort_orig_ms": o[0], "ort_comp_ms": o[1], "ort_speedup": o[0] / o[1],
                    "ort_portable_speedup": o[0] / o[2], "ort_bound_speedup": o[0] / o[3],
                    "paper_ort_speedup": o[0] / o[4], "paper_vs_r16_ort_paired": paired(times[:, 4], times[:, 1]),
                    "r16_vs_bound_ort_paired": paired(times[:, 1], times[:, 3])})
        if HAS_OPS:
            row.update({"ort_ops_speedup": o[0] / o[6], "ops_vs_bound_ort_paired": paired(times[:, 6], times[:, 3]),
                        "paper_vs_ops_ort_paired": paired(times[:, 4], times[:, 6])})
        if "tract" in RUNTIMES:
            row["tract_comp_vs_ort_orig"] = o[0] / row["tract_comp_ms"]
    if "ortopt" in RUNTIMES:
        # The ops graph too: the optimizer's shape inference knows no BipartiteMerge, so it fuses less there.
        skip_layernorms, times = in_child(ortopt_times, [src, ort_r16, ort_bound] + models[6:7], name, batch, runs)
        o = [float(m) for m in np.median(times, axis=0)]
        row.update({"ortopt_orig_ms": o[0], "ortopt_comp_ms": o[1], "ortopt_speedup": o[0] / o[1],
                    "ortopt_bound_speedup": o[0] / o[2], "ortopt_skip_layernorms": skip_layernorms,
                    "ortopt_r16_vs_bound_paired": paired(times[:, 1], times[:, 2])})
        if HAS_OPS:
            row.update({"ortopt_ops_speedup": o[0] / o[3], "ortopt_ops_vs_bound_paired": paired(times[:, 3], times[:, 2])})
    try:
        import openvino  # noqa: F401
        has_openvino = True
    except ImportError:
        has_openvino = False
        if "openvino" in RUNTIMES:
            print("openvino is not installed: no OpenVINO columns (pip install openvino)", file=sys.stderr)
    if "openvino" in RUNTIMES and has_openvino:
        for precision, key in (("f32", "ov"), (None, "ovdef")):
            times, outs = in_child(openvino_times, ov_models, batch, runs, precision)
            o = [float(m) for m in np.median(times, axis=0)]
            row.update({f"{key}_orig_ms": o[0], f"{key}_comp_ms": o[1], f"{key}_speedup": o[0] / o[1],
                        f"{key}_bound_speedup": o[0] / o[2],
                        f"{key}_paper_vs_r16_paired": paired(times[:, 3], times[:, 1]),
                        f"{key}_r16_vs_bound_paired": paired(times[:, 1], times[:, 2])})
            if HAS_OPS:
                row.update({f"{key}_ops_speedup": o[0] / o[4], f"{key}_ops_vs_bound_paired": paired(times[:, 4], times[:, 5]),
                            f"{key}_paper_vs_ops_paired": paired(times[:, 3], times[:, 4])})
            if precision is None:
                # The default precision's own error: each model's output against its f32 output.
                for k, which in ((0, "orig"), (1, "comp")):
                    ref = row.pop(f"_ov_f32_{which}_out")
                    row[f"ovdef_{which}_max_rel_err"] = float(np.abs(outs[k] - ref).max() / np.abs(ref).max())
            else:
                row["_ov_f32_orig_out"], row["_ov_f32_comp_out"] = outs[0], outs[1]
    rows.append(row)
    print(json.dumps(row), file=sys.stderr, flush=True)

def cell(r, key, fmt):
    """A table cell: the value formatted, or - where it was not measured."""
    v = r.get(key)
    return fmt(v) if v is not None else "-"


x = lambda v: f"{v:.2f}x"  # noqa: E731
ms = lambda v: f"{v:.1f}"  # noqa: E731
ci = lambda p: f"{p[0]:.3f} ({p[1]:.3f}-{p[2]:.3f})"  # noqa: E731
print(f"threads {args.threads}; medians of runs in turns (one untimed, then up to {RUNS_PER_TURN} timed, per model per turn); "
      "speedup = original / compiled on the same runtime")
print("bound = the same token counts with tokens dropped, not merged: no merging cost, the best any ToMe graph can do")
print("r16 / bound = our time over the bound's, runs paired within turns (1.03 = 3% slower than the bound); "
      "median, 95% bootstrap interval")
print("paper / r16 = the paper export's time over ours, runs paired within turns (> 1: ours is faster); "
      "median, 95% bootstrap interval")
print("tract r16 = the --target tract graph; tract portable = the standard-op graph in tract; tract r0 = the --target tract "
      "graph with nothing merged; merge = the matching and merge nodes' share of tract's per-node profile")
print("ort opt = each graph after onnxruntime.transformers.optimizer (vit, opt_level 0); SkipLN = its "
      "SkipLayerNormalization fusions, original / compiled / bound (/ ops); ov = OpenVINO f32, ov default = its default precision "
      "(bf16 where the CPU has it), err = each model's output at that precision against its own f32 output, "
      "max |d| / max |y|")
print("ort = onnxruntime without its BiasGelu fusion (slower than the Add and Gelu it fuses, and made only where shapes are "
      "known: the original and the bound, not past a merge); orig, BiasGelu fused / not = the original's time with the "
      "fusion over without (> 1: the fusion slows it)")
print("ort r16 = the --target onnxruntime graph (standard-op merge, onnxruntime's Attention op), its bound likewise; "
      "ort portable = the standard-op graph (every runtime's) in onnxruntime; ov r16 = the standard-op graph")
print("ops = each block's merge one BipartiteMerge node, with tome-compile's plugins loaded: the --target onnxruntime-ops "
      "graph (and onnxruntime's Attention) with libtome_ort_ops in onnxruntime, the --target openvino-ops graph (Q·Kᵀ "
      "scaled after its MatMul) with libtome_ov_ops in OpenVINO; each ops graph's bound is its target's (--bound --target)")
columns = [
    ("model", "model", str), ("batch", "batch", str), ("ideal (MACs)", "ideal", x),
    ("tract orig ms", "tract_orig_ms", ms), ("tract r16 ms", "tract_comp_ms", ms), ("tract r16", "tract_speedup", x),
    ("tract portable", "tract_portable_speedup", x), ("tract bound", "tract_bound_speedup", x),
    ("tract r0", "tract_r0_speedup", x), ("r16 / bound, tract", "tract_r16_vs_bound_paired", ci),
    ("merge, tract", "tract_merge_share", lambda v: f"{100 * v:.1f}%"),
    ("ort orig ms", "ort_orig_ms", ms), ("orig, BiasGelu fused / not, ort", "ort_orig_fused_paired", ci),
    ("ort r16 ms", "ort_comp_ms", ms), ("ort r16", "ort_speedup", x),
    ("ort bound", "ort_bound_speedup", x), ("r16 / bound, ort", "r16_vs_bound_ort_paired", ci),
    ("paper export, ort", "paper_ort_speedup", x),
    ("paper / r16, ort", "paper_vs_r16_ort_paired", ci), ("ort portable", "ort_portable_speedup", x),
    ("ort ops", "ort_ops_speedup", x), ("ops / bound, ort", "ops_vs_bound_ort_paired", ci),
    ("paper / ops, ort", "paper_vs_ops_ort_paired", ci),
    ("ort opt orig ms", "ortopt_orig_ms", ms), ("ort opt r16", "ortopt_speedup", x), ("ort opt bound", "ortopt_bound_speedup", x),
    ("r16 / bound, ort opt", "ortopt_r16_vs_bound_paired", ci),
    ("ort opt ops", "ortopt_ops_speedup", x), ("ops / bound, ort opt", "ortopt_ops_vs_bound_paired", ci),
    ("SkipLN", "ortopt_skip_layernorms", lambda v: " / ".join(str(k) for k in v)),
    ("ov orig ms", "ov_orig_ms", ms), ("ov r16", "ov_speedup", x), ("ov bound", "ov_bound_speedup", x),
    ("r16 / bound, ov", "ov_r16_vs_bound_paired", ci),
    ("paper / r16, ov", "ov_paper_vs_r16_paired", ci),
    ("ov ops", "ov_ops_speedup", x), ("ops / bound, ov", "ov_ops_vs_bound_paired", ci),
    ("paper / ops, ov", "ov_paper_vs_ops_paired", ci),
    ("ov default orig ms", "ovdef_orig_ms", ms), ("ov default r16", "ovdef_speedup", x),
    ("ov default bound", "ovdef_bound_speedup", x), ("ov default ops", "ovdef_ops_speedup", x),
    ("ops / bound, ov default", "ovdef_ops_vs_bound_paired", ci),
    ("paper / ops, ov default", "ovdef_paper_vs_ops_paired", ci),
    ("ov default err, orig", "ovdef_orig_max_rel_err", lambda v: f"{v:.1e}"),
    ("ov default err, r16", "ovdef_comp_max_rel_err", lambda v: f"{v:.1e}"),
    ("tract r16 vs ort orig", "tract_comp_vs_ort_orig", x),
]
measured = [c for c in columns if any(r.get(c[1]) is not None for r in rows)]
print("| " + " | ".join(c[0] for c in measured) + " |")
print("|" + "---|" * len(measured))
for r in rows:
    print("| " + " | ".join(cell(r, key, fmt) for _, key, fmt in measured) + " |")
