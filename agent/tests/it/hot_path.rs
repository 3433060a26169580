//! Measuring a request allocates nothing: the recording calls of the request path run
//! under an allocator that counts allocations (`allocation-counter`).

use std::time::{Duration, SystemTime};

use falaj_agent::metrics::ModelMetrics;
use falaj_common::profile::{ColumnProfile, DataProfile};
use falaj_common::tensor::{DataType, Dim, Signature, Tensor, TensorData, TensorSpec};

fn spec(name: &str, datatype: DataType, width: Option<u64>) -> TensorSpec {
    let mut shape = vec![Dim::Symbol("batch".into())];
    shape.extend(width.map(Dim::Fixed));
    TensorSpec { name: name.into(), datatype, shape }
}

#[test]
fn recording_a_request_allocates_nothing() {
    let values: Vec<f64> = (0..1000).map(f64::from).collect();
    let reference = DataProfile {
        rows: 1000,
        inputs: (0..3).map(|i| ColumnProfile::of("x", i, &format!("f{i}"), &values, 10)).collect(),
        outputs: vec![ColumnProfile::of("label", 0, "label", &[0.0, 1.0, 2.0], 10)],
    };
    let signature = Signature {
        inputs: vec![spec("x", DataType::Fp32, Some(3))],
        outputs: vec![spec("label", DataType::Int64, None)],
    };
    let metrics = ModelMetrics::new("m", 1, &signature, Some(&reference), SystemTime::now());
    let inputs = [Tensor {
        shape: vec![4, 3],
        data: TensorData::Fp32(vec![
            1.0, 500.0, 999.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0,
        ]),
    }];
    let outputs = [Tensor { shape: vec![4], data: TensorData::Int64(vec![0, 1, 2, 1]) }];

    let counted = allocation_counter::measure(|| {
        for i in 0..1000 {
            metrics.record_inputs(&inputs);
            metrics.record(Duration::from_micros(50 + i), Some(&outputs));
            metrics.record_refused();
        }
    });
    assert_eq!(counted.count_total, 0, "the request path allocated: {counted:?}");

    // What was recorded is all there when the window closes (which allocates, and is
    // seen to: the counter works).
    let mut closed = None;
    let closing = allocation_counter::measure(|| closed = metrics.close(SystemTime::now()));
    assert!(closing.count_total > 0);
    let window = closed.unwrap().counts;
    assert_eq!((window.requests, window.errors, window.rows), (2000, 1000, 4000));
    assert_eq!(window.latency.count(), 1000);
    assert_eq!(window.inputs.len(), 3);
    assert_eq!(window.inputs.iter().map(|c| c.iter().sum::<u64>()).collect::<Vec<_>>(), [4000; 3]);
    assert_eq!(window.outputs, vec![vec![1000, 2000, 1000, 0]]);
}
