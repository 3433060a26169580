"""MLServer custom runtime serving ONNX models with ONNX Runtime.

This is the HTTP anchor for the Falaj CPU-engine benchmark: the same corpus models and the
same Open Inference Protocol (KServe v2) JSON requests are sent to Falaj's REST server and to
MLServer running this runtime, so the comparison measures the serving stack, not the engine.

The session is pinned like the in-process anchor (benches/ort_anchor.py): one intra-op and
one inter-op thread, sequential execution, CPUExecutionProvider only.

Decoding: numeric inputs become numpy arrays of the request's datatype and shape; BYTES
inputs become a numpy object array of Python str (UTF-8 decoded if they arrive as bytes).
Encoding: numeric outputs keep their datatype, string outputs are sent as BYTES, and ZipMap
outputs (ONNX Runtime returns a list of dicts) become the dense float32 [rows, classes]
matrix in the class-label order declared by the graph's ZipMap node.

Start (from the repository root, after `pip install -r benches/mlserver/requirements.txt`
in a virtualenv such as target/mlserver-venv):

    PYTHONPATH=benches/mlserver target/mlserver-venv/bin/mlserver start MODELS_DIR

where MODELS_DIR holds settings.json ({"parallel_workers": 0, "metrics_endpoint": null,
"http_port": ..., "grpc_port": ...}) and one folder per model with a model-settings.json:
{"name": "NAME", "implementation": "runtime.OnnxRuntimeModel",
 "parameters": {"uri": "/abs/path/model.onnx"}}. Stop it with SIGINT or SIGTERM.
"""

import numpy as np
import onnx
import onnxruntime as ort
from mlserver import MLModel
from mlserver.types import InferenceRequest, InferenceResponse, ResponseOutput
from mlserver.utils import get_model_uri

_NUMPY = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32,
    "UINT64": np.uint64, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32,
    "INT64": np.int64, "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
}
_DATATYPE = {np.dtype(v).str: k for k, v in _NUMPY.items()}


def _flatten(data):
    """The v2 protocol allows nested lists; MLServer hands them over as they came."""
    if isinstance(data, (list, tuple)) and data and isinstance(data[0], (list, tuple)):
        return [x for row in data for x in _flatten(row)]
    return data


def _decode(inp):
    data = _flatten(getattr(inp.data, "root", inp.data))
    if inp.datatype == "BYTES":
        data = [x.decode("utf-8") if isinstance(x, bytes) else x for x in data]
        return np.array(data, dtype=object).reshape(inp.shape)
    return np.asarray(data, dtype=_NUMPY[inp.datatype]).reshape(inp.shape)


def _encode(name, value, labels):
    if labels is not None:  # ZipMap: a list of {label: probability} dicts
        dense = np.array([[row[k] for k in labels] for row in value], dtype=np.float32)
        return _encode(name, dense, None)
    value = np.asarray(value)
    if value.dtype.kind in "OUS":
        data = [x.decode("utf-8") if isinstance(x, bytes) else str(x) for x in value.ravel()]
        datatype = "BYTES"
    else:
        data, datatype = value.ravel().tolist(), _DATATYPE[value.dtype.str]
    return ResponseOutput(name=name, shape=list(value.shape), datatype=datatype, data=data)


class OnnxRuntimeModel(MLModel):
    async def load(self) -> bool:
        path = await get_model_uri(self._settings)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self._session = ort.InferenceSession(
            path, options, providers=["CPUExecutionProvider"]
        )
        self._outputs = [o.name for o in self._session.get_outputs()]
        # ZipMap class labels, in the order the node declares them (the dicts ONNX Runtime
        # returns are built from an ordered map, so their key order is not to be trusted).
        graph = onnx.load(path, load_external_data=False).graph
        self._zipmap = {}
        for node in graph.node:
            if node.op_type == "ZipMap":
                attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
                labels = attrs.get("classlabels_int64s") or [
                    s.decode("utf-8") for s in attrs.get("classlabels_strings", [])
                ]
                self._zipmap[node.output[0]] = list(labels)
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = {inp.name: _decode(inp) for inp in payload.inputs}
        wanted = [o.name for o in payload.outputs] if payload.outputs else self._outputs
        values = self._session.run(wanted, feeds)
        return InferenceResponse(
            model_name=self.name,
            id=payload.id,
            outputs=[
                _encode(n, v, self._zipmap.get(n)) for n, v in zip(wanted, values)
            ],
        )
