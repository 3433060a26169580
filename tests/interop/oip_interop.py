"""Interoperability check against tools Falaj did not write.

  export DIR     trains a scikit-learn MLP on synthetic data and exports it with skl2onnx
                 (symbolic batch dimension) to DIR/model.onnx, with inputs in DIR/inputs.npy
  check URL DIR  asks a running Falaj agent at URL for predictions with Triton's own Python
                 HTTP client (JSON and binary tensors), runs the same model and inputs in
                 ONNX Runtime, and fails unless they agree within 1e-4; prints a JSON summary

Run by tests/interop.rs; the packages come from tests/interop/requirements.txt.
"""

import json
import sys
from pathlib import Path

import numpy as np


def export(out: Path) -> None:
    from sklearn.neural_network import MLPClassifier
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 6)).astype(np.float32)
    y = ((x[:, 0] * x[:, 1] + x[:, 2] - 0.5 * x[:, 3]) > 0).astype(np.int64) + (x[:, 4] > 1.2)
    clf = MLPClassifier(hidden_layer_sizes=(32, 16), max_iter=400, random_state=0).fit(x, y)
    onx = to_onnx(
        clf,
        initial_types=[("input", FloatTensorType([None, 6]))],
        options={id(clf): {"zipmap": False}},
        target_opset=17,
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.onnx").write_bytes(onx.SerializeToString())
    np.save(out / "inputs.npy", rng.normal(size=(64, 6)).astype(np.float32))


def check(url: str, work: Path) -> None:
    import onnxruntime as ort
    import tritonclient.http as httpclient

    x = np.load(work / "inputs.npy")
    session = ort.InferenceSession(str(work / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    expected = dict(zip(names, session.run(None, {"input": x})))

    client = httpclient.InferenceServerClient(url)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("skl-mlp")
    meta = client.get_model_metadata("skl-mlp")
    summary = {"metadata_inputs": meta["inputs"], "checks": []}
    for binary in (True, False):
        for rows in (1, 7, 64):
            inp = httpclient.InferInput("input", [rows, 6], "FP32")
            inp.set_data_from_numpy(x[:rows], binary_data=binary)
            outputs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in names]
            result = client.infer("skl-mlp", [inp], outputs=outputs)
            for name in names:
                got = result.as_numpy(name)
                want = expected[name][:rows]
                assert got.shape == want.shape, (name, got.shape, want.shape)
                diff = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64))))
                assert diff <= 1e-4, f"{name} differs from ONNX Runtime by {diff}"
                summary["checks"].append({"output": name, "rows": rows, "binary": binary, "max_abs_diff": diff})
    print(json.dumps(summary))


if __name__ == "__main__":
    if sys.argv[1] == "export":
        export(Path(sys.argv[2]))
    elif sys.argv[1] == "check":
        check(sys.argv[2], Path(sys.argv[3]))
    else:
        sys.exit(f"unknown command {sys.argv[1]}")
