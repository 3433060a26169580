//! Writing small ONNX models: a graph builder over tract's protobuf types, and the MLP
//! classifier export used for the sample model.

use prost::Message;
use tract_onnx::pb::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto,
    TensorShapeProto, TypeProto, ValueInfoProto, attribute_proto::AttributeType, tensor_proto,
    tensor_shape_proto, type_proto,
};

use crate::tensor::{DataType, Dim};
use crate::train::Mlp;

/// The opset models are written for.
pub(crate) const OPSET: i64 = 17;
/// The ONNX IR version matching [`OPSET`].
const IR_VERSION: i64 = 8;

/// A node attribute.
#[derive(Debug, Clone)]
pub enum Attr {
    /// An integer.
    Int(&'static str, i64),
    /// A list of integers.
    Ints(&'static str, Vec<i64>),
    /// A float.
    Float(&'static str, f32),
}

impl Attr {
    fn proto(self) -> AttributeProto {
        let mut a = AttributeProto::default();
        match self {
            Self::Int(name, v) => {
                a.name = name.into();
                a.i = v;
                a.r#type = AttributeType::Int as i32;
            }
            Self::Ints(name, v) => {
                a.name = name.into();
                a.ints = v;
                a.r#type = AttributeType::Ints as i32;
            }
            Self::Float(name, v) => {
                a.name = name.into();
                a.f = v;
                a.r#type = AttributeType::Float as i32;
            }
        }
        a
    }
}

fn elem_type(dt: DataType) -> i32 {
    use tensor_proto::DataType as T;
    (match dt {
        DataType::Bool => T::Bool,
        DataType::Uint8 => T::Uint8,
        DataType::Uint16 => T::Uint16,
        DataType::Uint32 => T::Uint32,
        DataType::Uint64 => T::Uint64,
        DataType::Int8 => T::Int8,
        DataType::Int16 => T::Int16,
        DataType::Int32 => T::Int32,
        DataType::Int64 => T::Int64,
        DataType::Fp16 => T::Float16,
        DataType::Fp32 => T::Float,
        DataType::Fp64 => T::Double,
        DataType::Bytes => T::String,
    }) as i32
}

fn value_info(name: &str, dt: DataType, shape: &[Dim]) -> ValueInfoProto {
    use tensor_shape_proto::{Dimension, dimension::Value};
    let dim = |d: &Dim| Dimension {
        value: match d {
            Dim::Fixed(n) => Some(Value::DimValue(*n as i64)),
            Dim::Symbol(s) => Some(Value::DimParam(s.clone())),
            Dim::Any => None,
        },
        ..Dimension::default()
    };
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: elem_type(dt),
                shape: Some(TensorShapeProto { dim: shape.iter().map(dim).collect() }),
            })),
            ..TypeProto::default()
        }),
        ..ValueInfoProto::default()
    }
}

/// Builds an ONNX graph node by node.
#[derive(Debug, Default)]
pub struct GraphBuilder {
    graph: GraphProto,
}

impl GraphBuilder {
    /// An empty graph called `name`.
    pub fn new(name: &str) -> Self {
        Self { graph: GraphProto { name: name.into(), ..GraphProto::default() } }
    }

    /// Declares a graph input.
    pub fn input(&mut self, name: &str, dt: DataType, shape: &[Dim]) -> &mut Self {
        self.graph.input.push(value_info(name, dt, shape));
        self
    }

    /// Declares a graph output.
    pub fn output(&mut self, name: &str, dt: DataType, shape: &[Dim]) -> &mut Self {
        self.graph.output.push(value_info(name, dt, shape));
        self
    }

    /// Adds a float initializer (a weight).
    pub fn weights(&mut self, name: &str, dims: &[usize], values: &[f32]) -> &mut Self {
        assert_eq!(dims.iter().product::<usize>(), values.len(), "initializer {name}");
        self.graph.initializer.push(TensorProto {
            name: name.into(),
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: tensor_proto::DataType::Float as i32,
            raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ..TensorProto::default()
        });
        self
    }

    /// Adds an int64 initializer (a shape, an axis list).
    pub fn ints(&mut self, name: &str, values: &[i64]) -> &mut Self {
        self.graph.initializer.push(TensorProto {
            name: name.into(),
            dims: vec![values.len() as i64],
            data_type: tensor_proto::DataType::Int64 as i32,
            int64_data: values.to_vec(),
            ..TensorProto::default()
        });
        self
    }

    /// Adds a node.
    pub fn node(
        &mut self,
        op: &str,
        inputs: &[&str],
        outputs: &[&str],
        attrs: Vec<Attr>,
    ) -> &mut Self {
        let index = self.graph.node.len();
        self.graph.node.push(NodeProto {
            name: format!("{op}_{index}"),
            op_type: op.into(),
            input: inputs.iter().map(|&s| s.into()).collect(),
            output: outputs.iter().map(|&s| s.into()).collect(),
            attribute: attrs.into_iter().map(Attr::proto).collect(),
            ..NodeProto::default()
        });
        self
    }

    /// Encodes the model as ONNX protobuf bytes.
    pub fn encode(&self, producer: &str) -> Vec<u8> {
        ModelProto {
            ir_version: IR_VERSION,
            opset_import: vec![OperatorSetIdProto { domain: String::new(), version: OPSET }],
            producer_name: producer.into(),
            producer_version: env!("CARGO_PKG_VERSION").into(),
            graph: Some(self.graph.clone()),
            ..ModelProto::default()
        }
        .encode_to_vec()
    }
}

/// Exports a trained classifier as ONNX: input `input` `[N, features]` FP32; outputs
/// `probabilities` `[N, classes]` FP32 (softmax) and `label` `[N]` INT64 (arg-max).
pub fn mlp_classifier(mlp: &Mlp, input: &str, producer: &str) -> Vec<u8> {
    let n = || Dim::Symbol("N".into());
    let features = mlp.layers.first().map_or(0, |l| l.inputs);
    let classes = mlp.layers.last().map_or(0, |l| l.outputs);
    let mut g = GraphBuilder::new("mlp_classifier");
    g.input(input, DataType::Fp32, &[n(), Dim::Fixed(features as u64)]);
    let mut current = input.to_owned();
    for (i, layer) in mlp.layers.iter().enumerate() {
        let (w, b, out) =
            (format!("dense{i}.weight"), format!("dense{i}.bias"), format!("dense{i}"));
        g.weights(&w, &[layer.outputs, layer.inputs], &layer.weights);
        g.weights(&b, &[layer.outputs], &layer.bias);
        g.node("Gemm", &[&current, &w, &b], &[&out], vec![Attr::Int("transB", 1)]);
        current = out;
        if i + 1 < mlp.layers.len() {
            let relu = format!("relu{i}");
            g.node("Relu", &[&current], &[&relu], vec![]);
            current = relu;
        }
    }
    g.node("Softmax", &[&current], &["probabilities"], vec![Attr::Int("axis", 1)]);
    g.node("ArgMax", &[&current], &["label"], vec![Attr::Int("axis", 1), Attr::Int("keepdims", 0)]);
    g.output("probabilities", DataType::Fp32, &[n(), Dim::Fixed(classes as u64)]);
    g.output("label", DataType::Int64, &[n()]);
    g.encode(producer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::OnnxModel;
    use crate::sample::{self, FEATURE_COUNT};
    use crate::tensor::{Tensor, TensorData};
    use crate::train::{TrainConfig, train_classifier};

    #[test]
    fn exported_classifier_agrees_with_the_trainer() {
        let data = sample::generate(2_000, 3, &[]);
        let config = TrainConfig { max_epochs: 5, ..TrainConfig::default() };
        let (mlp, _) = train_classifier(&data.features, FEATURE_COUNT, &data.labels, 3, &config);
        let model = OnnxModel::load(&mlp_classifier(&mlp, "input", "test")).unwrap();
        let sig = model.signature();
        assert_eq!(sig.inputs[0].shape, vec![Dim::Symbol("N".into()), Dim::Fixed(8)]);
        assert_eq!(
            sig.outputs.iter().map(|o| o.name.as_str()).collect::<Vec<_>>(),
            ["probabilities", "label"]
        );
        assert_eq!(sig.outputs[1].datatype, DataType::Int64);

        let rows = 37;
        let x = data.features[..rows * FEATURE_COUNT].to_vec();
        let out = model
            .run(vec![Tensor {
                shape: vec![rows as u64, FEATURE_COUNT as u64],
                data: TensorData::Fp32(x.clone()),
            }])
            .unwrap();
        let TensorData::Int64(labels) = &out[1].data else { panic!("{:?}", out[1]) };
        let expected: Vec<i64> = mlp.predict(&x).into_iter().map(i64::from).collect();
        assert_eq!(labels, &expected);
        let TensorData::Fp32(p) = &out[0].data else { panic!() };
        assert_eq!(out[0].shape, vec![rows as u64, 3]);
        for row in p.chunks(3) {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        }
    }

    #[test]
    fn unnamed_and_named_symbols_both_resolve_per_run() {
        // y = x * 2 over an input of shape [N, ?]: any N and any width in one plan.
        let mut g = GraphBuilder::new("scale");
        g.input("x", DataType::Fp64, &[Dim::Symbol("N".into()), Dim::Any]);
        g.node("Add", &["x", "x"], &["y"], vec![]);
        g.output("y", DataType::Fp64, &[Dim::Symbol("N".into()), Dim::Any]);
        let model = OnnxModel::load(&g.encode("test")).unwrap();
        assert_eq!(model.signature().inputs[0].shape, vec![Dim::Symbol("N".into()), Dim::Any]);
        for (n, w) in [(1u64, 1u64), (3, 5), (2, 7)] {
            let x: Vec<f64> = (0..n * w).map(|v| v as f64).collect();
            let out = model
                .run(vec![Tensor { shape: vec![n, w], data: TensorData::Fp64(x.clone()) }])
                .unwrap();
            assert_eq!(out[0].shape, vec![n, w]);
            assert_eq!(out[0].data, TensorData::Fp64(x.iter().map(|v| v * 2.0).collect()));
        }
    }

    #[test]
    fn refuses_bytes_that_are_not_onnx_and_unsupported_graphs() {
        assert!(matches!(
            OnnxModel::load(b"definitely not protobuf \xff\xff"),
            Err(crate::onnx::OnnxError::Decode(_))
        ));
        let mut g = GraphBuilder::new("bad");
        g.input("x", DataType::Fp32, &[Dim::Fixed(2)]);
        g.node("NoSuchOperator", &["x"], &["y"], vec![]);
        g.output("y", DataType::Fp32, &[Dim::Fixed(2)]);
        let err = OnnxModel::load(&g.encode("test")).unwrap_err();
        assert!(err.to_string().contains("NoSuchOperator"), "{err}");
    }
}
