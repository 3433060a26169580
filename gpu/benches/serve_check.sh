#!/usr/bin/env bash
# On the lent GPU machine (called by device.sh, or alone after its first lines): the agent
# as a process serving a bundle whose runtime hint is gpu, with the packaged defaults
# (software adapters refused): the metadata must name wgpu-gpu and the answers must match
# tract's, computed by the same binary with [engine] runtime = "cpu".
set -euo pipefail
falaj=.devbin/falaj
work="$(mktemp -d)"
python3 - "$work/cnn.onnx" <<'PY'
import sys
import numpy as np, onnx
from onnx import helper, TensorProto, numpy_helper
rng = np.random.default_rng(1)
w = numpy_helper.from_array(rng.normal(0, 0.2, (16, 3, 3, 3)).astype(np.float32), "w")
h = numpy_helper.from_array(rng.normal(0, 0.2, (10, 16)).astype(np.float32), "h")
nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
         helper.make_node("Relu", ["c"], ["r"]),
         helper.make_node("GlobalAveragePool", ["r"], ["g"]),
         helper.make_node("Flatten", ["g"], ["f"]),
         helper.make_node("Gemm", ["f", "h"], ["l"], transB=1),
         helper.make_node("Softmax", ["l"], ["p"], axis=1)]
graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 32, 32])],
                          [helper.make_tensor_value_info("p", TensorProto.FLOAT, ["N", 10])], [w, h])
onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), sys.argv[1])
PY
$falaj control keys init --dir "$work/keys" --region gpu-1 > /dev/null
$falaj control bundle build --keys "$work/keys" --model "$work/cnn.onnx" --name vision --version 1 \
    --runtime gpu --out "$work/vision.falaj" > /dev/null
$falaj agent init --data-dir "$work/agent" --region gpu-1 --trust "$work/keys/root.json" > /dev/null
$falaj agent import "$work/vision.falaj" --data-dir "$work/agent" > /dev/null
python3 - "$work" "$falaj" <<'PY'
import json, os, subprocess, sys, urllib.request
import numpy as np
work, falaj = sys.argv[1], sys.argv[2]
x = np.random.default_rng(2).normal(size=(8, 3, 32, 32)).astype(np.float32)
def serve(runtime):
    with open(f"{work}/agent-{runtime}.toml", "w") as f:
        f.write(f'[engine]\nruntime = "{runtime}"\n')
        if os.environ.get("FALAJ_ALLOW_SOFTWARE_GPU"):  # to try the script without a GPU
            f.write("allow_software_gpu = true\n")
    p = subprocess.Popen([falaj, "agent", "serve", "--data-dir", f"{work}/agent", "--config",
                          f"{work}/agent-{runtime}.toml", "--http", "127.0.0.1:8765"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in p.stdout:
        if "serving the Open Inference Protocol" in line:
            break
    base = "http://127.0.0.1:8765/v2/models/vision"
    meta = json.load(urllib.request.urlopen(base))
    body = json.dumps({"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.ravel().tolist()}]}).encode()
    req = urllib.request.Request(base + "/infer", body, {"Content-Type": "application/json"})
    out = json.load(urllib.request.urlopen(req))
    p.terminate(); p.wait()
    return meta["parameters"]["engines"]["1"], np.array(out["outputs"][0]["data"], np.float32)
gpu_engine, gpu = serve("auto")
cpu_engine, cpu = serve("cpu")
diff = float(np.abs(gpu - cpu).max())
print(f"agent on this machine, bundle hinted gpu: engine {gpu_engine}; with runtime=cpu: {cpu_engine}; "
      f"max abs difference {diff:.1e} over {gpu.size} outputs")
assert gpu_engine == "wgpu-gpu" and cpu_engine == "tract-cpu" and diff < 1e-4
print("serve check passed")
PY
