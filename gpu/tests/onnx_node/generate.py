"""Writes ONNX's own backend node tests for the operators the GPU engine implements.

The onnx wheel ships the test cases as code (onnx.backend.test.case.node), not as data;
this writes them in the layout of ONNX's repository: DIR/test_x/model.onnx and
DIR/test_x/test_data_set_0/{input,output}_N.pb. Usage: generate.py DIR OP [OP ...]
"""

import os
import sys

import numpy as np
from onnx import TensorProto, numpy_helper
from onnx.backend.test.case import node


def main() -> None:
    out_dir, ops = sys.argv[1], set(sys.argv[2:])
    written = 0
    for case in node.collect_testcases():
        model = case.model
        if {n.op_type for n in model.graph.node} - ops:
            continue  # uses an operator outside the list (expanded functions, say)
        inputs, outputs = case.data_sets[0]
        if not all(isinstance(v, (np.ndarray, TensorProto)) for v in [*inputs, *outputs]):
            continue  # sequences, maps, optionals: not tensors
        case_dir = os.path.join(out_dir, case.name)
        data_dir = os.path.join(case_dir, "test_data_set_0")
        os.makedirs(data_dir, exist_ok=True)
        with open(os.path.join(case_dir, "model.onnx"), "wb") as f:
            f.write(model.SerializeToString())
        for kind, values, infos in (("input", inputs, model.graph.input), ("output", outputs, model.graph.output)):
            for i, (value, info) in enumerate(zip(values, infos)):
                tensor = value if isinstance(value, TensorProto) else numpy_helper.from_array(value, info.name)
                with open(os.path.join(data_dir, f"{kind}_{i}.pb"), "wb") as f:
                    f.write(tensor.SerializeToString())
        written += 1
    print(f"{written} cases written to {out_dir}")


if __name__ == "__main__":
    main()
