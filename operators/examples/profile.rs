//! A per-node profile of an ONNX model as the CPU engine plans it for one concrete input
//! shape: the same registration and folding as the engine, then `--runs` calls timed node
//! by node, summed by node and by operator, the slowest first.
//!
//! `cargo run --release -p falaj-operators --example profile -- MODEL.onnx NAME=1,3,224,224
//! [--runs 20] [--tract conv,matmul,softmax] [--top 30] [--quantile 0.5]`; `--tract` leaves
//! those standard operators to tract's own kernels (see [`falaj_operators::Native`]), for
//! A/B runs; `--quantile 0` takes each node's fastest call instead of its median (steadier
//! than the median on a machine other processes load).

#![allow(clippy::wildcard_imports)]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use falaj_operators::Native;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::plan::SimpleState;
use tract_onnx::tract_hir::internal::TractErrorContext;

fn main() -> TractResult<()> {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str| argv.iter().position(|a| a == name).and_then(|i| argv.get(i + 1));
    let path = argv.first().context("MODEL.onnx NAME=d0,d1,... [--runs N] [--tract ops]")?;
    let runs: usize = flag("--runs").map_or(Ok(20), |r| r.parse())?;
    let top: usize = flag("--top").map_or(Ok(30), |r| r.parse())?;
    let quantile: f64 = flag("--quantile").map_or(Ok(0.5), |r| r.parse())?;
    if !(0.0..=1.0).contains(&quantile) {
        tract_onnx::tract_hir::internal::bail!("--quantile takes a number from 0 to 1");
    }
    let mut native = Native::ALL;
    for op in flag("--tract").map(|s| s.split(',').collect::<Vec<_>>()).unwrap_or_default() {
        match op {
            "conv" => native.conv = false,
            "matmul" => native.matmul = false,
            "softmax" => native.softmax = false,
            other => tract_onnx::tract_hir::internal::bail!(
                "--tract takes conv, matmul, softmax; not {other}"
            ),
        }
    }
    let shapes: Vec<(String, Vec<usize>)> = argv
        .iter()
        .skip(1)
        .take_while(|a| !a.starts_with("--"))
        .map(|a| {
            let (name, dims) = a.split_once('=').context("NAME=d0,d1,...")?;
            let dims = dims.split(',').map(str::parse).collect::<Result<_, _>>()?;
            Ok((name.to_owned(), dims))
        })
        .collect::<TractResult<_>>()?;

    let mut onnx = onnx();
    falaj_operators::register_with(&mut onnx.op_register, native);
    onnx.ignore_value_info = true;
    let mut proto = onnx.proto_model_for_path(path)?;
    if let Some(graph) = &mut proto.graph {
        falaj_operators::nn::fold::fold_convolutions_for(graph, native);
        if native.matmul {
            falaj_operators::nn::fold::fold_matmuls(graph);
        }
    }
    let mut model = onnx.model_for_proto_model(&proto)?;
    let mut inputs = TVec::new();
    for (i, outlet) in model.input_outlets()?.to_vec().iter().enumerate() {
        let name = &model.node(outlet.node).name;
        let dims = shapes
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, d)| d.clone())
            .with_context(|| format!("no shape given for input {name}"))?;
        let len: usize = dims.iter().product();
        let values: Vec<f32> = (0..len).map(|j| ((j * 7919) % 1000) as f32 / 1000.0).collect();
        inputs.push(tensor1(&values).into_shape(&dims)?.into_tvalue());
        model.set_input_fact(i, InferenceFact::dt_shape(f32::datum_type(), dims))?;
    }
    let plan = model.into_optimized()?.into_runnable()?;
    let mut state = SimpleState::new(&plan)?;
    state.run(inputs.clone())?;

    let mut samples: HashMap<usize, Vec<Duration>> = HashMap::new();
    let mut whole = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        state.run_plan_with_eval(inputs.clone(), |session, op_state, node, node_inputs| {
            let t = Instant::now();
            let out = tract_onnx::tract_core::plan::eval(session, op_state, node, node_inputs);
            samples.entry(node.id).or_default().push(t.elapsed());
            out
        })?;
        whole.push(start.elapsed());
    }
    report(&plan, samples, whole, (path, top, native, quantile))
}

type Plan = TypedSimplePlan;

/// Prints the whole call's p50, then the nodes' medians (or other quantile) summed by
/// operator, then the slowest nodes.
fn report(
    plan: &Plan,
    samples: HashMap<usize, Vec<Duration>>,
    mut whole: Vec<Duration>,
    (path, top, native, quantile): (&str, usize, Native, f64),
) -> TractResult<()> {
    let runs = whole.len();
    whole.sort();
    // Each node's median call, times the calls: the machine is shared, and a median
    // ignores the calls another process interrupted.
    let per_node: HashMap<usize, Duration> = samples
        .into_iter()
        .map(|(id, mut d)| {
            d.sort();
            let at = ((d.len() - 1) as f64 * quantile).round() as usize;
            (id, d[at] * runs as u32)
        })
        .collect();
    let graph = plan.model();
    let total: Duration = per_node.values().sum();
    println!(
        "{path}: {} nodes, p50 {:.1} µs per call ({runs} calls), sum of node medians {:.1} µs, native {native:?}",
        graph.nodes().len(),
        whole[runs / 2].as_secs_f64() * 1e6,
        total.as_secs_f64() * 1e6 / runs as f64
    );
    let share = |d: Duration| 100.0 * d.as_secs_f64() / total.as_secs_f64();
    let per_call = |d: Duration| d.as_secs_f64() * 1e6 / runs as f64;

    let mut by_op: HashMap<String, (Duration, usize)> = HashMap::new();
    for (&id, &d) in &per_node {
        let e = by_op.entry(graph.node(id).op().name().to_string()).or_default();
        e.0 += d;
        e.1 += 1;
    }
    let mut by_op: Vec<_> = by_op.into_iter().collect();
    by_op.sort_by_key(|(_, (d, _))| std::cmp::Reverse(*d));
    println!("\nby operator: µs per call (node medians), share, nodes");
    for (op, (d, n)) in by_op {
        println!("{:>10.1} {:>5.1}% {n:>4}  {op}", per_call(d), share(d));
    }

    let mut nodes: Vec<_> = per_node.into_iter().collect();
    nodes.sort_by_key(|(_, d)| std::cmp::Reverse(*d));
    println!("\nslowest nodes: µs per call, share, node, input shapes -> output shape");
    for (id, d) in nodes.into_iter().take(top) {
        let node = graph.node(id);
        let facts = graph.node_input_facts(id)?;
        let ins: Vec<String> = facts.iter().map(|f| format!("{:?}", f.shape)).collect();
        let out = graph.outlet_fact(OutletId::new(id, 0)).map(|f| format!("{:?}", f.shape))?;
        println!(
            "{:>10.1} {:>5.1}%  {} ({}) {} -> {out}  {}",
            per_call(d),
            share(d),
            node.name,
            node.op().name(),
            ins.join(" "),
            node.op().info()?.join("; ")
        );
    }
    Ok(())
}
