# Times two ONNX models in onnxruntime (CPU), in turns, for `tune --runtime
# onnxruntime`. Arguments: ORIGINAL CANDIDATE SHAPE(comma list) ITERS THREADS
# RUNS_PER_TURN. Prints one JSON list per model of milliseconds per run.
import json
import sys
import time

try:
    import numpy as np
    import onnxruntime as ort
except ImportError as e:
    sys.exit(f"--runtime onnxruntime needs python3 with numpy and onnxruntime installed (pip install onnxruntime): {e}")

paths = sys.argv[1:3]
shape = [int(v) for v in sys.argv[3].split(",")]
iters, threads, per_turn = (int(v) for v in sys.argv[4:7])
options = ort.SessionOptions()
options.intra_op_num_threads = threads
sessions = [ort.InferenceSession(p, options, providers=["CPUExecutionProvider"]) for p in paths]
first = sessions[0].get_inputs()[0]
dtype = np.float16 if first.type == "tensor(float16)" else np.float32
x = np.random.default_rng(0).uniform(-1, 1, shape).astype(dtype)
feeds = [{s.get_inputs()[0].name: x} for s in sessions]
runs = [[], []]
for turn in range(-(-iters // per_turn)):
    for k in ((turn + j) % 2 for j in range(2)):
        sessions[k].run(None, feeds[k])
        while len(runs[k]) < min(iters, (turn + 1) * per_turn):
            start = time.perf_counter()
            sessions[k].run(None, feeds[k])
            runs[k].append((time.perf_counter() - start) * 1000)
print(json.dumps(runs))
