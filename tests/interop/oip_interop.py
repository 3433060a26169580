"""Interoperability check against tools Falaj did not write.

  export DIR     trains a scikit-learn MLP on synthetic data and exports it with skl2onnx
                 (symbolic batch dimension) to DIR/model.onnx, with inputs in DIR/inputs.npy
  check URL DIR  asks a running Falaj agent at URL for predictions with Triton's own Python
                 HTTP client (JSON and binary tensors), runs the same model and inputs in
                 ONNX Runtime, and fails unless they agree within 1e-4; prints a JSON summary
  check-grpc ADDR HTTP_URL DIR
                 the same with Triton's own gRPC client (tritonclient.grpc) at ADDR: raw
                 tensors through its API, typed contents through its generated stub, and a
                 stream; then each error case, whose status code must be Triton's and whose
                 message must be the one the REST endpoint at HTTP_URL gives; prints a summary
  check-tls HTTPS_ADDR GRPC_ADDR DIR CA KEY OTHER_KEY
                 both of Triton's clients over TLS trusting CA (tritonclient.http with ssl
                 options, tritonclient.grpc with ssl=True and root certificates), with the
                 API key KEY in their headers: outputs equal to ONNX Runtime's; without a key
                 401 / UNAUTHENTICATED, with OTHER_KEY (scoped to another model) 403 /
                 PERMISSION_DENIED, with REST's messages; liveness open; prints a summary
  check-mtls HTTPS_ADDR GRPC_ADDR DIR CA CERT KEY API_KEY
                 against an agent that also wants a client certificate: both clients with
                 CERT/KEY (and API_KEY) get ONNX Runtime's outputs; without a certificate
                 neither gets an answer; prints a summary

Run by tests/external/interop.rs; the packages come from tests/interop/requirements.txt.
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


def check_grpc(addr: str, http_url: str, work: Path) -> None:
    import queue

    import onnxruntime as ort
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.grpc import service_pb2
    from tritonclient.utils import InferenceServerException

    x = np.load(work / "inputs.npy")
    session = ort.InferenceSession(str(work / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    expected = dict(zip(names, session.run(None, {"input": x})))

    client = grpcclient.InferenceServerClient(addr)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("skl-mlp") and client.is_model_ready("skl-mlp", "1")
    meta = client.get_model_metadata("skl-mlp", as_json=True)
    server = client.get_server_metadata(as_json=True)
    index = client.get_model_repository_index(as_json=True)
    summary = {
        "metadata_inputs": meta["inputs"],
        "server": server["name"],
        "index": index["models"],
        "checks": [],
        "errors": [],
    }

    def compare(name, got, rows, how):
        want = expected[name][:rows]
        assert got.shape == want.shape, (how, name, got.shape, want.shape)
        diff = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64))))
        assert diff <= 1e-4, f"{how}: {name} differs from ONNX Runtime by {diff}"
        summary["checks"].append({"output": name, "rows": rows, "how": how, "max_abs_diff": diff})

    for rows in (1, 7, 64):
        inp = grpcclient.InferInput("input", [rows, 6], "FP32")
        inp.set_data_from_numpy(x[:rows])
        outputs = [grpcclient.InferRequestedOutput(n) for n in names]
        result = client.infer("skl-mlp", [inp], outputs=outputs, request_id=f"raw-{rows}")
        assert result.get_response().id == f"raw-{rows}"
        for name in names:
            compare(name, result.as_numpy(name), rows, "raw")

        # Typed contents: the client's API always sends raw tensors, so through its stub.
        request = service_pb2.ModelInferRequest(model_name="skl-mlp")
        tensor = request.inputs.add(name="input", datatype="FP32", shape=[rows, 6])
        tensor.contents.fp32_contents.extend(x[:rows].ravel().tolist())
        response = client._client_stub.ModelInfer(request)
        assert not response.raw_output_contents, "a typed request is answered typed"
        for out in response.outputs:
            field = {"FP32": "fp32_contents", "INT64": "int64_contents"}[out.datatype]
            got = np.array(getattr(out.contents, field)).reshape(list(out.shape))
            compare(out.name, got, rows, "typed")

    # A stream: three requests pipelined on one call, answered in order.
    answers = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    for rows in (1, 7, 64):
        inp = grpcclient.InferInput("input", [rows, 6], "FP32")
        inp.set_data_from_numpy(x[:rows])
        client.async_stream_infer("skl-mlp", [inp], request_id=f"s-{rows}")
    for rows in (1, 7, 64):
        result, error = answers.get(timeout=60)
        assert error is None, error
        assert result.get_response().id == f"s-{rows}"
        for name in names:
            compare(name, result.as_numpy(name), rows, "stream")
    client.stop_stream()

    # Errors: Triton's status codes, REST's messages.
    rest = httpclient.InferenceServerClient(http_url)

    def refused(call):
        try:
            call()
        except InferenceServerException as e:
            return e
        raise AssertionError("the request was not refused")

    def both(code, model, data, datatype="FP32", version=""):
        inp = grpcclient.InferInput("input", list(data.shape), datatype)
        inp.set_data_from_numpy(data)
        g = refused(lambda: client.infer(model, [inp], model_version=version))
        rinp = httpclient.InferInput("input", list(data.shape), datatype)
        rinp.set_data_from_numpy(data, binary_data=False)
        r = refused(lambda: rest.infer(model, [rinp], model_version=version))
        assert g.status() == f"StatusCode.{code}", (code, g.status(), g.message())
        assert g.message() == r.message(), (g.message(), r.message())
        summary["errors"].append({"code": code, "message": g.message()})

    both("NOT_FOUND", "no-such-model", x[:1])
    both("NOT_FOUND", "skl-mlp", x[:1], version="9")
    both("INVALID_ARGUMENT", "skl-mlp", x[:1, :5])
    both("INVALID_ARGUMENT", "skl-mlp", x[:1].astype(np.float64), datatype="FP64")
    e = refused(lambda: client.get_model_metadata("no-such-model"))
    assert e.status() == "StatusCode.NOT_FOUND", e.status()
    print(json.dumps(summary))


def check_tls(https_addr: str, grpc_addr: str, work: Path, ca: str, key: str, other: str) -> None:
    import onnxruntime as ort
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    x = np.load(work / "inputs.npy")
    session = ort.InferenceSession(str(work / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    expected = dict(zip(names, session.run(None, {"input": x})))
    rest = httpclient.InferenceServerClient(https_addr, ssl=True, ssl_options={"ca_certs": ca})
    grpc = grpcclient.InferenceServerClient(grpc_addr, ssl=True, root_certificates=ca)
    # Liveness needs no key; readiness of a model does.
    assert rest.is_server_live() and grpc.is_server_live()
    summary = {"checks": [], "errors": []}
    headers = {"Authorization": f"Bearer {key}"}
    # gRPC metadata keys are lowercase.
    metadata = {"authorization": f"Bearer {key}"}

    def compare(name, got, rows, how):
        want = expected[name][:rows]
        assert got.shape == want.shape, (how, name, got.shape, want.shape)
        diff = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64))))
        assert diff <= 1e-4, f"{how}: {name} differs from ONNX Runtime by {diff}"
        summary["checks"].append({"output": name, "rows": rows, "how": how, "max_abs_diff": diff})

    assert rest.is_model_ready("skl-mlp", headers=headers)
    assert grpc.is_model_ready("skl-mlp", headers=metadata)
    for rows in (1, 7):
        inp = httpclient.InferInput("input", [rows, 6], "FP32")
        inp.set_data_from_numpy(x[:rows], binary_data=True)
        result = rest.infer("skl-mlp", [inp], headers=headers)
        for name in names:
            compare(name, result.as_numpy(name), rows, "https")
        ginp = grpcclient.InferInput("input", [rows, 6], "FP32")
        ginp.set_data_from_numpy(x[:rows])
        result = grpc.infer("skl-mlp", [ginp], headers=metadata)
        for name in names:
            compare(name, result.as_numpy(name), rows, "grpc+tls")

    def refused(call):
        try:
            call()
        except InferenceServerException as e:
            return e
        raise AssertionError("the request was not refused")

    def both(status, code, extra):
        inp = httpclient.InferInput("input", [1, 6], "FP32")
        inp.set_data_from_numpy(x[:1], binary_data=False)
        r = refused(lambda: rest.infer("skl-mlp", [inp], headers=extra))
        ginp = grpcclient.InferInput("input", [1, 6], "FP32")
        ginp.set_data_from_numpy(x[:1])
        lower = {k.lower(): v for k, v in extra.items()} if extra else None
        g = refused(lambda: grpc.infer("skl-mlp", [ginp], headers=lower))
        assert r.status() == status, (status, r.status(), r.message())
        assert g.status() == f"StatusCode.{code}", (code, g.status(), g.message())
        assert g.message() == r.message(), (g.message(), r.message())
        summary["errors"].append({"status": status, "code": code, "message": g.message()})

    both("401", "UNAUTHENTICATED", None)
    both("401", "UNAUTHENTICATED", {"Authorization": "Bearer falaj_not-a-key"})
    both("403", "PERMISSION_DENIED", {"Authorization": f"Bearer {other}"})
    print(json.dumps(summary))


def check_mtls(https_addr, grpc_addr, work: Path, ca, cert, key_file, api_key) -> None:
    import onnxruntime as ort
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    x = np.load(work / "inputs.npy")[:3]
    session = ort.InferenceSession(str(work / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    expected = dict(zip(names, session.run(None, {"input": x})))
    summary = {"checks": [], "refused": []}
    options = {"ca_certs": ca, "certfile": cert, "keyfile": key_file}
    rest = httpclient.InferenceServerClient(https_addr, ssl=True, ssl_options=options)
    grpc = grpcclient.InferenceServerClient(
        grpc_addr, ssl=True, root_certificates=ca, private_key=key_file, certificate_chain=cert
    )
    inp = httpclient.InferInput("input", [3, 6], "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    got_rest = rest.infer("skl-mlp", [inp], headers={"Authorization": f"Bearer {api_key}"})
    ginp = grpcclient.InferInput("input", [3, 6], "FP32")
    ginp.set_data_from_numpy(x)
    got_grpc = grpc.infer("skl-mlp", [ginp], headers={"authorization": f"Bearer {api_key}"})
    for how, result in (("https+cert", got_rest), ("grpc+cert", got_grpc)):
        for name in names:
            diff = float(np.max(np.abs(result.as_numpy(name).astype(np.float64) - expected[name])))
            assert diff <= 1e-4, f"{how}: {name} differs from ONNX Runtime by {diff}"
            summary["checks"].append({"output": name, "how": how, "max_abs_diff": diff})

    # Without a client certificate the handshake fails: no answer, whatever the key.
    bare_rest = httpclient.InferenceServerClient(https_addr, ssl=True, ssl_options={"ca_certs": ca})
    bare_grpc = grpcclient.InferenceServerClient(grpc_addr, ssl=True, root_certificates=ca)
    for how, call in (
        ("https", lambda: bare_rest.is_server_live()),
        ("grpc", lambda: bare_grpc.is_server_live()),
    ):
        try:
            call()
        except Exception as e:  # the TLS failure surfaces as each client's own error
            summary["refused"].append({"how": how, "error": type(e).__name__})
            continue
        raise AssertionError(f"{how} without a client certificate was answered")
    print(json.dumps(summary))


if __name__ == "__main__":
    if sys.argv[1] == "export":
        export(Path(sys.argv[2]))
    elif sys.argv[1] == "check":
        check(sys.argv[2], Path(sys.argv[3]))
    elif sys.argv[1] == "check-grpc":
        check_grpc(sys.argv[2], sys.argv[3], Path(sys.argv[4]))
    elif sys.argv[1] == "check-tls":
        check_tls(sys.argv[2], sys.argv[3], Path(sys.argv[4]), *sys.argv[5:8])
    elif sys.argv[1] == "check-mtls":
        check_mtls(sys.argv[2], sys.argv[3], Path(sys.argv[4]), *sys.argv[5:9])
    else:
        sys.exit(f"unknown command {sys.argv[1]}")
