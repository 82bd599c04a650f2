#!/usr/bin/env python3
"""The paper's PyTorch ToMe as ONNX peers for ViT-S/16 and ViT-L/16@384, made the way
../shared/fixtures/bench/paper_tome_r16_vit_base_patch16_224.onnx was made.

The paper's code (facebookresearch/ToMe, `tome.patch.timm(model)`, `model.r = 16`, prop_attn
default True) on a timm ViT with timm's own random initialisation (pretrained=False, 1000 classes),
exported by torch.onnx's TorchScript exporter (dynamo=False), opset 17, input `pixel_values`
[batch,3,S,S], output `logits` [batch,1000], dynamic axis `batch`. Stripped like the other bench
graphs: every initializer of 1024 bytes or more (all of them here) becomes an external reference
into `<name>.weights`, contiguous in initializer order, which is not written;
../shared/tools/fill_weights.py makes it (deterministic random values).

Writes into bench/ (or OUTDIR):
    paper_tome_r16_vit_small_patch16_224.onnx   (197 tokens, 12 blocks; r clamps to 10 in block 12)
    paper_tome_r16_vit_large_patch16_384.onnx   (577 tokens, 24 blocks; r = 16 in every block)

Usage:
    python gen_paper_exports.py [--out OUTDIR] [--check TMPDIR] [--compare-base SHARED_GRAPH]
      --check TMPDIR   after writing, fills each graph's weights into TMPDIR with fill_weights.py, runs it
                       in onnxruntime at batch 1 and 8, loads the same filled values into the PyTorch ToMe
                       model and prints the largest relative difference (asserts <= 1e-4).
      --compare-base P exports vit_base_patch16_224 the same way into a temp folder and compares it with P
                       (the shared paper_tome_r16_vit_base_patch16_224.onnx): bytes, nodes, initializers.

Environment (Python 3.11, venv outside the repository; one thread):
    pip install torch==2.11.0 torchvision==0.26.0 timm==1.0.29 numpy==2.4.6 onnx==1.23.2 onnxruntime==1.32.0
    # ToMe: facebookresearch/ToMe at commit af95e4b1befa172dadccd8c81e223b10090f9579 (2023-03-30),
    # installed from a checkout of that commit with `pip install --no-deps <checkout>` (its setup.py pins
    # timm==0.4.12; its timm patch runs unchanged on timm 1.0.29); where GitHub is reachable:
    #   pip install --no-deps git+https://github.com/facebookresearch/ToMe@af95e4b1befa172dadccd8c81e223b10090f9579
    OMP_NUM_THREADS=1
"""
import argparse
import collections
import filecmp
import os
import shutil
import subprocess
import sys
import tempfile

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import timm  # noqa: E402
import tome  # noqa: E402
import torch  # noqa: E402
from onnx import numpy_helper  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
R = 16
MODELS = [("vit_small_patch16_224", 224), ("vit_large_patch16_384", 384)]
SEED = 0  # the weights are stripped; the seed only decides which equal initializers the exporter shares
FILL = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "tools", "fill_weights.py"))
sys.path.insert(0, os.path.join(HERE, "..", "fixtures", "gen"))
from gen_bench_families import externalize  # noqa: E402  (how the shared bench graphs were stripped)


def build(name):
    torch.manual_seed(SEED)
    with torch.no_grad():
        m = timm.create_model(name, pretrained=False, num_classes=1000).eval()
    tome.patch.timm(m)  # prop_attn=True, trace_source=False: the paper's defaults
    m.r = R
    return m


def schedule(m, size):
    """Per-block r after the paper's clamp r = min(r, (t - protected) // 2), and tokens entering each block."""
    t = (size // 16) ** 2 + 1
    protected = 1 if m._tome_info["class_token"] else 0
    rs, tokens = [], [t]
    for _ in m.blocks:
        r = min(R, (t - protected) // 2)
        rs.append(r)
        t -= max(r, 0)
        tokens.append(t)
    return rs, tokens


def export(m, size, path):
    x = torch.zeros(1, 3, size, size)
    with torch.no_grad():
        torch.onnx.export(m, (x,), path, dynamo=False, opset_version=17, input_names=["pixel_values"],
                          output_names=["logits"],
                          dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}})


def strip(src, dst, weights_name):
    """Every initializer of >= 1024 bytes becomes an external reference into weights_name, contiguous in
    initializer order (what onnx.save_model's all_tensors_to_one_file with size_threshold=1024 gives);
    nothing is written there."""
    model = onnx.load(src, load_external_data=False)
    n_ext, offset = externalize(model, weights_name)
    onnx.save_model(model, dst)
    return {"nodes": len(model.graph.node), "initializers": len(model.graph.initializer), "external": n_ext,
            "weights_bytes": offset, "onnx_bytes": os.path.getsize(dst)}


def param_map(m, full):
    """state_dict key -> (initializer name, transposed) in the exported graph `full` (with its data): a key
    is an initializer itself, or the output of an Identity of one (the exporter shares equal tensors), or
    (Linear weights) an initializer equal to its transpose, found by value."""
    g = full.graph
    inits = {t.name: t for t in g.initializer}
    ident = {n.output[0]: n.input[0] for n in g.node if n.op_type == "Identity" and n.input[0] in inits}
    values = {k: numpy_helper.to_array(t) for k, t in inits.items()}
    out = {}
    for k, p in m.state_dict().items():
        p = p.numpy()
        if k in inits:
            out[k] = (k, False)
        elif k in ident:
            out[k] = (ident[k], False)
        else:
            hits = [n for n, v in values.items() if v.shape == p.T.shape and np.array_equal(v, p.T)]
            assert len(hits) == 1, (k, hits)
            out[k] = (hits[0], True)
        name, tr = out[k]
        assert np.array_equal(values[name], p.T if tr else p), k
    return out


def ort_session(path):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3  # the exporter's rank-1 shape annotations on merged tensors warn at every run
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def check(name, size, graph, full, tmp, tokens_out):
    """Fills graph's weights into tmp, runs it in onnxruntime at batch 1 and 8, and compares with the PyTorch
    ToMe model holding the same filled values."""
    subprocess.run([sys.executable, FILL, graph, tmp], check=True, stdout=subprocess.DEVNULL)
    filled = os.path.join(tmp, os.path.basename(graph))
    m = build(name)
    mapping = param_map(m, onnx.load(full))
    fm = onnx.load(filled)  # reads tmp/<name>.weights
    vals = {t.name: numpy_helper.to_array(t) for t in fm.graph.initializer}
    del fm
    sd = {k: torch.from_numpy(np.array(vals[n].T if tr else vals[n])) for k, (n, tr) in mapping.items()}
    m.load_state_dict(sd, strict=True)
    del vals, sd
    sess = ort_session(filled)
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((8, 3, size, size)).astype(np.float32))
    res = {}
    for b in (1, 8):
        with torch.no_grad():
            ref = m(x[:b]).numpy()
        assert m._tome_info["size"].shape[1] == tokens_out
        got = sess.run(["logits"], {"pixel_values": x[:b].numpy()})[0]
        rel = float(np.abs(got - ref).max() / np.abs(ref).max())
        res[b] = {"shape": list(got.shape), "max_abs_ref": float(np.abs(ref).max()), "rel": rel,
                  "tokens_out": int(tokens_out), "finite": bool(np.isfinite(got).all())}
        print(f"  {name} batch {b}: ort {got.shape} finite={res[b]['finite']}, torch ToMe tokens out "
              f"{tokens_out}, max|ref| {res[b]['max_abs_ref']:.4g}, max rel diff {rel:.3g}", flush=True)
        assert got.shape == (b, 1000) and res[b]["finite"] and rel <= 1e-4, res[b]
    return res


def compare_base(shared_graph):
    name = "vit_base_patch16_224"
    tmp = tempfile.mkdtemp(prefix="paper_base_")
    try:
        full = os.path.join(tmp, "full.onnx")
        export(build(name), 224, full)
        mine = os.path.join(tmp, f"paper_tome_r{R}_{name}.onnx")
        info = strip(full, mine, f"paper_tome_r{R}_{name}.weights")
        a, b = onnx.load(mine, load_external_data=False), onnx.load(shared_graph, load_external_data=False)
        same_nodes = [(n.op_type, list(n.input), list(n.output), n.attribute) for n in a.graph.node] == \
                     [(n.op_type, list(n.input), list(n.output), n.attribute) for n in b.graph.node]
        same_inits = [(t.name, list(t.dims), [(e.key, e.value) for e in t.external_data]) for t in a.graph.initializer] == \
                     [(t.name, list(t.dims), [(e.key, e.value) for e in t.external_data]) for t in b.graph.initializer]
        print(f"  vit_base r{R} re-export: {info['nodes']} nodes (shared {len(b.graph.node)}), nodes+attributes equal "
              f"{same_nodes}, initializers+external refs equal {same_inits}, file bytes equal "
              f"{filecmp.cmp(mine, shared_graph, shallow=False)}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=HERE)
    ap.add_argument("--check", metavar="TMPDIR")
    ap.add_argument("--compare-base", metavar="SHARED_GRAPH")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.check:
        os.makedirs(args.check, exist_ok=True)
    print(f"torch {torch.__version__}, timm {timm.__version__}, onnx {onnx.__version__}, tome {tome.__file__}")
    if args.compare_base:
        compare_base(args.compare_base)
    for name, size in MODELS:
        out_name = f"paper_tome_r{R}_{name}"
        out = os.path.join(args.out, out_name + ".onnx")
        scratch = tempfile.mkdtemp(prefix="paper_export_", dir=args.check)
        try:
            m = build(name)
            rs, tokens = schedule(m, size)
            print(f"{name}: r per block {rs}; tokens entering each block {tokens[:-1]}, leaving {tokens[-1]}",
                  flush=True)
            full = os.path.join(scratch, "full.onnx")
            export(m, size, full)
            del m
            info = strip(full, out, out_name + ".weights")
            g = onnx.load(out, load_external_data=False)
            ops = collections.Counter(n.op_type for n in g.graph.node)
            print(f"  wrote {out}: {info}", flush=True)
            print(f"  ops {dict(ops.most_common())}", flush=True)
            if args.check:
                fill_dir = os.path.join(scratch, "filled")
                check(name, size, out, full, fill_dir, tokens[-1])
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
