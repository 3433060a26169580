"""ONNX Runtime anchor for benches/cpu_engine.rs: one corpus model, in process, one thread.

usage: ort_corpus.py MODEL_DIR --batches 1,64,1024 --seconds 5

MODEL_DIR is a corpus model's directory (tests/corpus/make_corpus.py): model.onnx and
pool.json. Inputs are the pool's rows taken in turn to make each batch, as
`falaj-agent bench --input-data` takes them: an input whose first axis the model leaves
free is tiled along it; any other input is given as it is. Each call is timed alone with
the inputs ready, `session.run` with intra_op_num_threads = inter_op_num_threads = 1 and
sequential execution. Prints one JSON object per line per batch size.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

NUMPY = {
    "FP32": np.float32,
    "FP64": np.float64,
    "FP16": np.float16,
    "INT64": np.int64,
    "INT32": np.int32,
    "BOOL": np.bool_,
}


def pool(model_dir: Path) -> dict:
    request = json.loads((model_dir / "pool.json").read_text())
    out = {}
    for i in request["inputs"]:
        if i["datatype"] == "BYTES":
            value = np.array(i["data"], dtype=object)
        else:
            data = [np.nan if v is None else v for v in i["data"]]
            value = np.array(data, dtype=NUMPY[i["datatype"]])
        out[i["name"]] = value.reshape(i["shape"])
    return out


def batched(session: ort.InferenceSession) -> dict:
    """Whether each input's first axis is free (a dim_param or nothing)."""
    return {i.name: bool(i.shape) and not isinstance(i.shape[0], int) for i in session.get_inputs()}


def tile(value: np.ndarray, batch: int) -> np.ndarray:
    rows = value.shape[0]
    return value[np.arange(batch) % rows]


def measure(session, feed, seconds):
    warm = time.perf_counter()
    calls = 0
    while calls < 3 or time.perf_counter() - warm < min(seconds / 10, 1.0):
        session.run(None, feed)
        calls += 1
    times = []
    spent = 0.0
    while len(times) < 3 or spent < seconds:
        t0 = time.perf_counter_ns()
        session.run(None, feed)
        t1 = time.perf_counter_ns()
        times.append(t1 - t0)
        spent += (t1 - t0) / 1e9
    times.sort()
    pick = lambda q: times[round((len(times) - 1) * q)] / 1e3
    return len(times), pick(0.5), pick(0.99), spent


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # shape warnings on every run of some exports
    session = ort.InferenceSession(str(args.model_dir / "model.onnx"), options, providers=["CPUExecutionProvider"])
    rows = pool(args.model_dir)
    free = batched(session)
    for batch in (int(b) for b in args.batches.split(",")):
        feed = {name: tile(v, batch) if free[name] else v for name, v in rows.items()}
        calls, p50, p99, spent = measure(session, feed, args.seconds)
        rows_per_s = (batch if any(free.values()) else 1) * calls / spent
        print(json.dumps({"onnxruntime": ort.__version__, "batch": batch, "calls": calls,
                          "p50_us": p50, "p99_us": p99, "rows_per_s": rows_per_s}), flush=True)


if __name__ == "__main__":
    main()
