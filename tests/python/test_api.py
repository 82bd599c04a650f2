"""The installed wheel's Python API against the cargo-built command line.

Usage: python test_api.py CLI_COMPILED.onnx TMPDIR, where CLI_COMPILED is
`tome-compile fixtures/timm_vit/model.onnx --r 8 -o ...` from the cargo
build. Run from the repository root in a virtual environment holding the
wheel, onnx and onnxruntime. Exits non-zero on the first failed check.
"""
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort

import tome_compile

cli_compiled, tmp = sys.argv[1], sys.argv[2]
model_path = "fixtures/timm_vit/model.onnx"
expected = open(cli_compiled, "rb").read()

# bytes in, bytes out: the command line's bytes.
compiled, report = tome_compile.compile(open(model_path, "rb").read(), r=8)
assert isinstance(compiled, bytes) and compiled == expected, "bytes differ from the CLI's"
assert report["tokens_out"] == 197 - 6 * 8 and len(report["blocks"]) == 6, report
assert report["schedule"] == "8" and report["output"] is None

# ModelProto in, ModelProto out.
proto, _ = tome_compile.compile(onnx.load(model_path), r=8)
assert isinstance(proto, onnx.ModelProto)
assert proto.SerializeToString() == onnx.load_from_string(expected).SerializeToString()

# A path in: written where asked, the same bytes.
out = os.path.join(tmp, "api.onnx")
result, _ = tome_compile.compile(model_path, r=8, output=out)
assert result == out and open(out, "rb").read() == expected
try:
    tome_compile.compile(model_path, r=8)
    raise AssertionError("a path without output= must be refused")
except TypeError as e:
    assert "output=" in str(e)

# Keyword arguments are the flags.
off, report_off = tome_compile.compile(open(model_path, "rb").read(), r="8:-1", prop_attn=False, target="tensorrt")
assert report_off["prop_attn"] is False and report_off["schedule"] == "8:-1" and report_off["target"] == "tensorrt"

# The compiled model runs in onnxruntime.
x = np.zeros((1, 3, 224, 224), np.float32)
y = ort.InferenceSession(compiled, providers=["CPUExecutionProvider"]).run(None, {"pixel_values": x})[0]
assert y.shape == (1, 10) and np.isfinite(y).all()

# inspect.
info = tome_compile.inspect(model_path, r=16)
assert info["tokens_out"] == 101 and info["predicted_speedup"] > 1.2, info

# Errors carry the --json kind, message and exit code.
for call, kind, code, words in [
    (lambda: tome_compile.compile(b"not onnx", r=8), "invalid_model", 2, "not a readable ONNX model"),
    (lambda: tome_compile.compile(open(model_path, "rb").read(), r=-3), "usage", 1, "r counts tokens"),
    (lambda: tome_compile.compile(open(model_path, "rb").read(), r=8, target="nope"), "usage", 1, "nope"),
]:
    try:
        call()
        raise AssertionError(f"expected a {kind} error")
    except tome_compile.TomeCompileError as e:
        assert (e.kind, e.exit_code) == (kind, code) and words in e.message, (e.kind, e.exit_code, e.message)

# tune from Python: bytes in, the plot's PNG in the report.
tuned, report = tome_compile.tune(open(model_path, "rb").read(), "fixtures/images", max_drop=0.05, metric="cosine",
                                  mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), iters=2, threads=1)
chosen = report["chosen"]
assert chosen["drop"] <= 0.05 and chosen["within_budget"], chosen
assert report["plot_png"][:8] == b"\x89PNG\r\n\x1a\n"
again, _ = tome_compile.compile(open(model_path, "rb").read(), r=chosen["schedule"])
assert tuned == again, "tune writes compile's bytes for the chosen schedule"
sweep = tome_compile.sweep(model_path, "fixtures/images", schedules=["4", "8:-1"], iters=1, threads=1)
assert [c["schedule"] for c in sweep["candidates"]] == ["4", "8:-1"] and sweep["metric"] == "agreement"
print("python API: ok")

# onnxruntime's custom-op library from the wheel runs --target onnxruntime-ops graphs.
plugged, report = tome_compile.compile(onnx.load(model_path), r=8, target="onnxruntime-ops")
assert sum(n.op_type == "BipartiteMerge" for n in plugged.graph.node) == 6, "one BipartiteMerge per merging block"
so = ort.SessionOptions()
so.register_custom_ops_library(tome_compile.onnxruntime_ops())
refs = np.load("fixtures/timm_vit/io.npz")
session = ort.InferenceSession(plugged.SerializeToString(), so, providers=["CPUExecutionProvider"])
y = session.run(None, {session.get_inputs()[0].name: refs["pixel_values"]})[0]
ref = refs["logits_r8_prop1"]
err = float(np.abs(y - ref).max() / np.abs(ref).max())
assert err <= 1e-4, f"onnxruntime-ops from the wheel: relative error {err}"
print("onnxruntime_ops(): ok")
