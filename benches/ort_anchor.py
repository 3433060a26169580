"""ONNX Runtime anchor for benches/serving.rs: the same model and inputs, one thread.

usage: ort_anchor.py MODEL.onnx INPUTS.f32 ROWS FEATURES SECONDS

INPUTS.f32 holds ROWS x FEATURES little-endian float32 values; each call scores one row,
cycling through them. Runs with 1 and with 2 concurrent callers (Python threads sharing one
session; ONNX Runtime releases the GIL while it runs) and prints one JSON object.
"""

import json
import sys
import threading
import time

import numpy as np
import onnxruntime as ort


def run(session, name, rows, seconds, clients):
    latencies = [[] for _ in range(clients)]
    stop = time.perf_counter() + seconds

    def loop(i):
        lat = latencies[i]
        k = i
        while True:
            x = rows[k % len(rows)]
            t0 = time.perf_counter_ns()
            session.run(None, {name: x})
            t1 = time.perf_counter_ns()
            lat.append(t1 - t0)
            k += clients
            if t1 / 1e9 > stop:
                break

    start = time.perf_counter()
    threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    all_lat = np.sort(np.concatenate([np.array(l, dtype=np.int64) for l in latencies]))
    return {
        "clients": clients,
        "requests": int(all_lat.size),
        "p50_us": float(all_lat[int(0.50 * (all_lat.size - 1))]) / 1e3,
        "p99_us": float(all_lat[int(0.99 * (all_lat.size - 1))]) / 1e3,
        "throughput_rps": all_lat.size / wall,
    }


def main():
    model, inputs, n, features, seconds = sys.argv[1:6]
    n, features, seconds = int(n), int(features), float(seconds)
    data = np.fromfile(inputs, dtype="<f4").reshape(n, features)
    rows = [data[i : i + 1] for i in range(n)]
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    run(session, name, rows, min(seconds, 0.5), 1)  # warm up
    results = [run(session, name, rows, seconds, c) for c in (1, 2)]
    print(json.dumps({"onnxruntime": ort.__version__, "results": results}))


if __name__ == "__main__":
    main()
