#!/usr/bin/env python3
"""Stable Diffusion 1.5 UNet, one step, plain vs Token Merging, every number of issue 16 from one command:
PyTorch plain vs tomesd, onnxruntime plain vs the tome-compile graph, FLOPs and peak memory, for each latent size
side by side.

Usage:
    python3 bench/sd_bench.py [--sizes 64,96] [--batch 1] [--iters 10] [--warmup 2] [--threads 2] [--quick]
        [--compiled PATH | --compiled 64=PATH,96=PATH] [--model FILLED.onnx] [--bench-dir DIR]
        [--ratio 0.5] [--max-downsample 1] [--use-rand] [--only flops,torch,ort,mem] [--json OUT]

The graph: bench/sd15_unet.onnx (structure only; fixtures/gen/gen_sd15_unet.py made it). Its weights are filled
into --bench-dir (default $TMPDIR/tome-bench) with ../shared/tools/fill_weights.py when missing (3.4 GB), or
--model names an already filled copy. The PyTorch UNet is diffusers' UNet2DConditionModel with the config recorded
in bench/sd15_unet.json, built on the meta device and then loaded FROM THE SAME FILLED WEIGHTS FILE through that
JSON's `torch_params` map (parameter -> initializer, as is / transposed / reshaped): PyTorch and onnxruntime
compute with the same numbers (random values: speed and memory only).
--compiled is the graph `tome-compile sd ...` wrote (one for every size, or one per size as SIZE=PATH). When the
external weights it names are not next to it, onnxruntime reads it from bytes with
session.model_external_initializers_file_folder_path set to the filled weights' folder. Without --compiled only plain onnxruntime is timed.

What is measured (each latent size; batch --batch, timestep 981, inputs standard normal from a fixed seed):
  flops   FLOPs of one UNet step, plain and with tomesd, counted by torch.utils.flop_counter.FlopCounterMode on the
          meta device (shapes only; the same ops as a real run: convolutions, matmuls, attention; elementwise ops,
          norms, softmax and the merge's gathers are not counted). FLOPs = 2 x MACs. ideal speedup = plain /
          tomesd; the share of convolutions; how many blocks tomesd merged in.
  torch   median ms of plain vs tomesd PyTorch on CPU (torch.inference_mode), timed interleaved in one process:
          the same UNet, tomesd.apply_patch / tomesd.remove_patch between turns (outside the timed region), the
          order of the two swapped every turn. tomesd's own speedup = plain / tomesd.
  ort     median ms of plain vs compiled graph in onnxruntime (CPUExecutionProvider, default graph
          optimizations, intra_op_num_threads = --threads), interleaved the same way in one process; speedup; and
          the plain graph's onnxruntime vs PyTorch ratio (different processes, same machine, same run).
  mem     peak resident memory (resource.getrusage(RUSAGE_SELF).ru_maxrss) of a fresh subprocess per runtime,
          configuration and size that loads the model and runs one step; also the resident size just before that
          step (/proc/self/statm), so peak - before is what the step itself adds. onnxruntime with its default
          CPU arena.
tomesd is applied as tomesd.apply_patch(unet, ratio, max_downsample, sx=2, sy=2, use_rand, merge_attn=True,
merge_crossattn=False, merge_mlp=False). use_rand defaults to False here (tomesd's own default is True): the
compiled graph is static and reproduces use_rand=False, so that is the like-for-like peer; --use-rand times
tomesd's default instead. The output says which was used.
Sizes must be multiples of 8 (the UNet's export assumed so).

--quick: 1 timed iteration, no warmup (a smoke run; numbers are not timings).
Needs: torch, diffusers, tomesd, onnx, onnxruntime, numpy. Made and smoke-tested with
  pip install torch==2.15.0 diffusers==0.42.1 tomesd==0.1.3 onnx==1.23.2 onnxruntime==1.32.0 numpy==2.4.6
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
GRAPH = os.path.join(HERE, "sd15_unet.onnx")
INFO = os.path.join(HERE, "sd15_unet.json")
SEQ, CTX, TIMESTEP, INPUT_SEED = 77, 768, 981, 2024


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="64,96", help="latent sizes (square), comma separated")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--iters", type=int, default=None, help="timed runs per model (default 10)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs per model first (default 2)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="1 timed iteration, no warmup: a smoke run")
    p.add_argument("--compiled", default=None, help="PATH, or SIZE=PATH,SIZE=PATH")
    p.add_argument("--model", default=None, help="a filled sd15_unet.onnx (default: fill into --bench-dir)")
    p.add_argument("--bench-dir", default=os.path.join(tempfile.gettempdir(), "tome-bench"))
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--max-downsample", type=int, default=1)
    p.add_argument("--use-rand", action="store_true", help="tomesd's default use_rand=True (default here: False)")
    p.add_argument("--only", default="flops,torch,ort,mem", help="which parts to run")
    p.add_argument("--json", default=None, help="write every number to this file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.iters = a.iters if a.iters is not None else (1 if a.quick else 10)
    a.warmup = a.warmup if a.warmup is not None else (0 if a.quick else 2)
    a.sizes = [int(s) for s in a.sizes.split(",") if s]
    a.only = set(a.only.split(","))
    for s in a.sizes:
        if s % 8:
            p.error(f"--sizes: {s} is not a multiple of 8")
    return a


def info():
    with open(INFO) as f:
        return json.load(f)


def compiled_paths(args):
    """{size: path} from --compiled (one path for every size, or SIZE=PATH,...)."""
    if not args.compiled:
        return {}
    if "=" not in args.compiled:
        return {s: args.compiled for s in args.sizes}
    out = {}
    for part in args.compiled.split(","):
        s, path = part.split("=", 1)
        out[int(s)] = path
    return out


# ---------------------------------------------------------------- inputs and models (workers)

def np_inputs(size, batch):
    import numpy as np
    rng = np.random.default_rng(INPUT_SEED)
    return {"sample": rng.standard_normal((batch, 4, size, size), dtype=np.float32),
            "timestep": np.array(TIMESTEP, dtype=np.int64),
            "encoder_hidden_states": rng.standard_normal((batch, SEQ, CTX), dtype=np.float32)}


def torch_unet(model_path, meta=False):
    """diffusers' SD 1.5 UNet; unless meta, its parameters read from the filled graph's weights (see doc)."""
    import numpy as np
    import onnx
    import torch
    from diffusers import UNet2DConditionModel
    from onnx import numpy_helper
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data
    meta_info = info()
    with torch.device("meta"):
        unet = UNet2DConditionModel(**meta_info["config"]).eval()
    if meta:
        return unet
    unet = unet.to_empty(device="cpu")
    graph = onnx.load(model_path, load_external_data=False)
    inits = {t.name: t for t in graph.graph.initializer}
    base = os.path.dirname(os.path.abspath(model_path))
    state = unet.state_dict()
    assert set(state) == set(meta_info["torch_params"]), "sd15_unet.json does not cover the UNet's parameters"
    with torch.no_grad():
        for k, m in meta_info["torch_params"].items():
            t = inits[m["initializer"]]
            if uses_external_data(t):
                ext = ExternalDataInfo(t)
                arr = np.fromfile(os.path.join(base, ext.location),
                                  dtype=onnx.helper.tensor_dtype_to_np_dtype(t.data_type),
                                  count=int(np.prod(t.dims)), offset=int(ext.offset or 0)).reshape(tuple(t.dims))
            else:
                arr = numpy_helper.to_array(t)
            if m["as"] == "T":
                arr = arr.T
            state[k].copy_(torch.from_numpy(np.array(arr, order="C")).reshape(state[k].shape))
    return unet


def tomesd_on(unet, args):
    import tomesd
    tomesd.apply_patch(unet, ratio=args.ratio, max_downsample=args.max_downsample, sx=2, sy=2,
                       use_rand=args.use_rand, merge_attn=True, merge_crossattn=False, merge_mlp=False)


def tomesd_off(unet):
    import tomesd
    tomesd.remove_patch(unet)


def torch_step(unet, x):
    import torch
    with torch.inference_mode():
        return unet(torch.from_numpy(x["sample"]), torch.from_numpy(x["timestep"]),
                    torch.from_numpy(x["encoder_hidden_states"]), return_dict=False)[0]


def external_dir(path, weights_dir):
    """None when every external data file the graph names lies next to it, else weights_dir (after checking the
    files are there): onnxruntime then reads the graph from bytes with its external initializers' folder set."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data
    g = onnx.load(path, load_external_data=False)
    locs = {ExternalDataInfo(t).location for t in g.graph.initializer if uses_external_data(t)}
    d = os.path.dirname(os.path.abspath(path))
    if all(os.path.exists(os.path.join(d, loc)) for loc in locs):
        return None
    for loc in locs:
        if not os.path.exists(os.path.join(weights_dir, loc)):
            sys.exit(f"{path} names external data {loc!r}, found neither next to it nor in {weights_dir}")
    return weights_dir


def ort_session(path, args, weights_dir=None):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if weights_dir:
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", weights_dir)
        with open(path, "rb") as f:
            return ort.InferenceSession(f.read(), so, providers=["CPUExecutionProvider"])
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def turns(runs, warmup, iters, prepare=None):
    """ms of each runner's timed runs: runners take turns, one run each, the order reversed every turn.
    prepare[j] (if given) is called untimed before each of runner j's runs."""
    n = len(runs)
    prepare = prepare or [None] * n
    ms = [[] for _ in runs]
    for i in range(warmup + iters):
        for j in (range(n) if i % 2 == 0 else reversed(range(n))):
            if prepare[j]:
                prepare[j]()
            t0 = time.perf_counter()
            runs[j]()
            if i >= warmup:
                ms[j].append((time.perf_counter() - t0) * 1e3)
    return ms


def set_threads(args):
    import torch
    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass


def worker_torch(args):
    import torch
    set_threads(args)
    unet = torch_unet(args.model)
    x = np_inputs(args.size, args.batch)
    step = lambda: torch_step(unet, x)  # noqa: E731
    plain, tome = turns([step, step], args.warmup, args.iters,
                        prepare=[lambda: tomesd_off(unet), lambda: tomesd_on(unet, args)])
    return {"plain_ms": plain, "tomesd_ms": tome, "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def worker_ort(args):
    import onnxruntime as ort
    x = np_inputs(args.size, args.batch)
    comp = compiled_paths(args).get(args.size)
    paths = [args.model] + ([comp] if comp else [])
    wdir = os.path.dirname(os.path.abspath(args.model))
    sessions = [ort_session(p, args, external_dir(p, wdir)) for p in paths]
    names = [{i.name for i in s.get_inputs()} for s in sessions]
    feeds = [{k: v for k, v in x.items() if k in n} for n in names]
    outs = [s.run(None, f)[0] for s, f in zip(sessions, feeds)]
    res = {"onnxruntime": ort.__version__, "threads": args.threads}
    if comp:
        import numpy as np
        res["compiled_vs_plain_max_rel"] = float(np.abs(outs[1] - outs[0]).max() / np.abs(outs[0]).max())
    ms = turns([lambda s=s, f=f: s.run(None, f) for s, f in zip(sessions, feeds)], args.warmup, args.iters)
    res["plain_ms"] = ms[0]
    if comp:
        res["compiled_ms"] = ms[1]
        res["compiled"] = comp
    return res


def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def maxrss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker_mem(args):
    kind = args.worker.split(":", 1)[1]  # torch-plain, torch-tomesd, ort-plain, ort-compiled
    x = np_inputs(args.size, args.batch)
    if kind.startswith("torch"):
        set_threads(args)
        unet = torch_unet(args.model)
        if kind == "torch-tomesd":
            tomesd_on(unet, args)
        step = lambda: torch_step(unet, x)  # noqa: E731
    else:
        path = args.model if kind == "ort-plain" else compiled_paths(args)[args.size]
        s = ort_session(path, args, external_dir(path, os.path.dirname(os.path.abspath(args.model))))
        feed = {k: v for k, v in x.items() if k in {i.name for i in s.get_inputs()}}
        step = lambda: s.run(None, feed)  # noqa: E731
    before, max_before = rss_mb(), maxrss_mb()
    step()
    return {"rss_before_step_mb": round(before, 1), "maxrss_before_step_mb": round(max_before, 1),
            "peak_mb": round(maxrss_mb(), 1), "step_adds_mb": round(maxrss_mb() - before, 1)}


def run_worker(args, worker, size, extra=()):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", worker, "--size", str(size), "--model", args.model,
           "--batch", str(args.batch), "--threads", str(args.threads), "--iters", str(args.iters),
           "--warmup", str(args.warmup), "--ratio", str(args.ratio), "--max-downsample", str(args.max_downsample)]
    cmd += (["--use-rand"] if args.use_rand else []) + (["--compiled", args.compiled] if args.compiled else [])
    cmd += ["--sizes", str(size)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode or not lines:
        sys.stderr.write(p.stderr[-4000:])
        sys.exit(f"worker {worker} at {size} failed (exit {p.returncode})")
    return json.loads(lines[-1][len("RESULT "):])


# ---------------------------------------------------------------- FLOPs (in process, meta device)

def count_flops(args, size):
    import torch
    import tomesd.merge as tmerge
    from torch.utils.flop_counter import FlopCounterMode
    unet = torch_unet(None, meta=True)
    s = torch.zeros(args.batch, 4, size, size, device="meta")
    e = torch.zeros(args.batch, SEQ, CTX, device="meta")
    t = torch.tensor(TIMESTEP, device="meta")
    res = {}
    calls = []
    orig = tmerge.bipartite_soft_matching_random2d

    def counted(metric, *a, **k):
        calls.append(int(metric.shape[1]))
        return orig(metric, *a, **k)

    for cfg in ("plain", "tomesd"):
        if cfg == "tomesd":
            tomesd_on(unet, args)
        fc = FlopCounterMode(display=False)
        tmerge.bipartite_soft_matching_random2d = counted
        try:
            with fc, torch.no_grad():
                unet(s, t, e, return_dict=False)
        finally:
            tmerge.bipartite_soft_matching_random2d = orig
        total = fc.get_total_flops()
        by_op = {str(k).replace("aten.", ""): int(v) for k, v in fc.get_flop_counts()["Global"].items()}
        res[cfg] = {"flops": int(total), "gflops": total / 1e9, "by_op": by_op, "conv_share": by_op.get("convolution", 0) / total}
    res["tomesd_merging_blocks"] = len(calls)
    res["tomesd_tokens_per_merging_block"] = calls
    res["ideal_speedup"] = res["plain"]["flops"] / res["tomesd"]["flops"]
    return res


# ---------------------------------------------------------------- driver

def ensure_model(args):
    if args.model:
        return
    path = os.path.join(args.bench_dir, "sd15_unet.onnx")
    if not os.path.exists(os.path.join(args.bench_dir, "sd15_unet.weights")):
        fill = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "tools", "fill_weights.py"))
        if not os.path.exists(fill):
            fill = "/work/shared/tools/fill_weights.py"
        print(f"filling the weights into {args.bench_dir} (3.4 GB) ...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, fill, GRAPH, args.bench_dir], check=True, stdout=subprocess.DEVNULL)
    args.model = path


def med(xs):
    return statistics.median(xs) if xs else None


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def table(args, res):
    cols = [f"{s}x{s}" for s in args.sizes]
    w = max(14, *(len(c) for c in cols))
    rows = []

    def row(label, key, spec):
        rows.append((label, [fmt(key(res["sizes"][c]), spec) for c in cols]))

    def g(*path):
        def f(d):
            for p in path:
                if d is None or p not in d:
                    return None
                d = d[p]
            return d
        return f

    if "flops" in args.only:
        row("FLOPs plain (G)", g("flops", "plain", "gflops"), ".1f")
        row("FLOPs tomesd (G)", g("flops", "tomesd", "gflops"), ".1f")
        row("ideal speedup", g("flops", "ideal_speedup"), ".3f")
        row("conv share plain", g("flops", "plain", "conv_share"), ".3f")
        row("conv share tomesd", g("flops", "tomesd", "conv_share"), ".3f")
        row("merging blocks", g("flops", "tomesd_merging_blocks"), "d")
    if "torch" in args.only:
        row("torch plain ms", g("torch", "plain_median_ms"), ".1f")
        row("torch tomesd ms", g("torch", "tomesd_median_ms"), ".1f")
        row("tomesd speedup", g("torch", "speedup"), ".3f")
    if "ort" in args.only:
        row("ORT plain ms", g("ort", "plain_median_ms"), ".1f")
        row("ORT compiled ms", g("ort", "compiled_median_ms"), ".1f")
        row("compiled speedup", g("ort", "speedup"), ".3f")
        row("ORT vs torch plain", g("ort_vs_torch_plain"), ".3f")
    if "mem" in args.only:
        for k in ("torch-plain", "torch-tomesd", "ort-plain", "ort-compiled"):
            row(f"{k} peak MB", g("mem", k, "peak_mb"), ".0f")
            row(f"{k} step adds MB", g("mem", k, "step_adds_mb"), ".0f")
    lw = max(len(r[0]) for r in rows) if rows else 10
    out = [f"{'':{lw}}  " + "  ".join(f"{c:>{w}}" for c in cols)]
    out += [f"{label:{lw}}  " + "  ".join(f"{v:>{w}}" for v in vals) for label, vals in rows]
    return "\n".join(out)


def main():
    args = parse()
    if args.worker:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        kind = args.worker.split(":")[0]
        r = {"torch": worker_torch, "ort": worker_ort, "mem": worker_mem}[kind](args)
        print("RESULT " + json.dumps(r), flush=True)
        return
    ensure_model(args)
    comp = compiled_paths(args)
    tomesd_call = (f"tomesd.apply_patch(unet, ratio={args.ratio}, max_downsample={args.max_downsample}, sx=2, sy=2, "
                   f"use_rand={args.use_rand}, merge_attn=True, merge_crossattn=False, merge_mlp=False)")
    res = {"model": os.path.abspath(args.model), "compiled": comp, "batch": args.batch, "threads": args.threads,
           "iters": args.iters, "warmup": args.warmup, "quick": args.quick, "tomesd_call": tomesd_call,
           "use_rand": args.use_rand, "timestep": TIMESTEP, "input_seed": INPUT_SEED,
           "memory_method": "resource.getrusage(RUSAGE_SELF).ru_maxrss of a fresh subprocess per runtime, "
                            "configuration and size (model load + one step); rss before the step from "
                            "/proc/self/statm",
           "flops_method": "torch.utils.flop_counter.FlopCounterMode on the meta device, FLOPs = 2 x MACs",
           "torch_weights": "loaded from the filled sd15_unet.weights via bench/sd15_unet.json torch_params",
           "sizes": {}}
    for size in args.sizes:
        r = res["sizes"][f"{size}x{size}"] = {}
        if "flops" in args.only:
            r["flops"] = count_flops(args, size)
        if "torch" in args.only:
            t = run_worker(args, "torch", size)
            t["plain_median_ms"], t["tomesd_median_ms"] = med(t["plain_ms"]), med(t["tomesd_ms"])
            t["speedup"] = t["plain_median_ms"] / t["tomesd_median_ms"]
            r["torch"] = t
        if "ort" in args.only:
            o = run_worker(args, "ort", size)
            o["plain_median_ms"] = med(o["plain_ms"])
            if "compiled_ms" in o:
                o["compiled_median_ms"] = med(o["compiled_ms"])
                o["speedup"] = o["plain_median_ms"] / o["compiled_median_ms"]
            r["ort"] = o
        if "torch" in r and "ort" in r:
            r["ort_vs_torch_plain"] = r["torch"]["plain_median_ms"] / r["ort"]["plain_median_ms"]
        if "mem" in args.only:
            kinds = ["torch-plain", "torch-tomesd", "ort-plain"] + (["ort-compiled"] if size in comp else [])
            r["mem"] = {k: run_worker(args, "mem:" + k, size) for k in kinds}
        print(f"done {size}x{size}", file=sys.stderr, flush=True)
    print(f"SD 1.5 UNet, one step, batch {args.batch}, threads {args.threads}, {args.iters} timed runs after "
          f"{args.warmup} warmup, interleaved{'  (--quick: smoke run, not timings)' if args.quick else ''}")
    print(f"tomesd: {tomesd_call}" + ("" if args.use_rand else "  (tomesd's default is use_rand=True)"))
    print(f"PyTorch weights: {res['torch_weights']}")
    print(f"FLOPs: {res['flops_method']}; memory: maxrss of a fresh subprocess per configuration")
    print(table(args, res))
    if "ort" in args.only and not comp:
        print("compiled column: pass --compiled PATH (the graph `tome-compile sd ...` wrote)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
