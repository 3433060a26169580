// Training a dense head `z = W x + b` (falaj_common::finetune, the CPU kernel's arithmetic):
// `forward` computes each batch row's logits, its loss and the loss's gradient with respect
// to them; `update` computes each parameter's gradient over the batch and applies the
// optimiser's step to it in place. An optimiser step is one dispatch of each.
//
// `params` is [W (outputs × inputs, row-major) | b (outputs)], `moments` Adam's
// [m | v] beside it. `step` is bound at a dynamic offset, one block per dispatch pair.

struct Shape {
    inputs: u32,
    outputs: u32,
    // 0: cross-entropy (one target per row, the class index); 1: mean squared error.
    objective: u32,
    // 0: SGD; 1: Adam.
    optimizer: u32,
    learning_rate: f32,
    l2: f32,
    beta1: f32,
    beta2: f32,
    one_minus_beta1: f32,
    one_minus_beta2: f32,
    epsilon: f32,
    _pad: u32,
}

struct Step {
    // The batch: entries `start .. start + len` of `order`.
    start: u32,
    len: u32,
    // 1: evaluation only (loss and correct flag, no gradient).
    evaluate: u32,
    _pad0: u32,
    // 1 / len, as the host computes it.
    scale: f32,
    // Adam's bias corrections 1 - β₁ᵗ and 1 - β₂ᵗ, as the host computes them.
    c1: f32,
    c2: f32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> shape: Shape;
@group(0) @binding(1) var<uniform> step: Step;
@group(0) @binding(2) var<storage, read> features: array<f32>;
@group(0) @binding(3) var<storage, read> targets: array<f32>;
@group(0) @binding(4) var<storage, read> order: array<u32>;
@group(0) @binding(5) var<storage, read_write> params: array<f32>;
@group(0) @binding(6) var<storage, read_write> moments: array<f32>;
// [batch row, output]: the logits, then the loss's gradient with respect to them.
@group(0) @binding(7) var<storage, read_write> dz: array<f32>;
// Per position in `order`: [loss, 1.0 when the arg-max is the label].
@group(0) @binding(8) var<storage, read_write> row_out: array<f32>;

const ROW_THREADS: u32 = 64u;
const NEG_INF: f32 = -3.4028235e38;
const NONE: u32 = 0xffffffffu;

var<workgroup> red: array<f32, 64>;
var<workgroup> red_i: array<u32, 64>;

fn reduce_max(lid: u32, value: f32) -> f32 {
    red[lid] = value;
    workgroupBarrier();
    for (var s = ROW_THREADS / 2u; s > 0u; s >>= 1u) {
        if (lid < s) {
            red[lid] = max(red[lid], red[lid + s]);
        }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}

fn reduce_sum(lid: u32, value: f32) -> f32 {
    red[lid] = value;
    workgroupBarrier();
    for (var s = ROW_THREADS / 2u; s > 0u; s >>= 1u) {
        if (lid < s) {
            red[lid] = red[lid] + red[lid + s];
        }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}

// Whether (bv, bi) beats (av, ai) as the arg-max: larger, or equal and earlier.
fn beats(av: f32, ai: u32, bv: f32, bi: u32) -> bool {
    return bi != NONE && (ai == NONE || bv > av || (bv == av && bi < ai));
}

// The index of the largest logit, the first on ties.
fn reduce_argmax(lid: u32, value: f32, index: u32) -> u32 {
    red[lid] = value;
    red_i[lid] = index;
    workgroupBarrier();
    for (var s = ROW_THREADS / 2u; s > 0u; s >>= 1u) {
        if (lid < s && beats(red[lid], red_i[lid], red[lid + s], red_i[lid + s])) {
            red[lid] = red[lid + s];
            red_i[lid] = red_i[lid + s];
        }
        workgroupBarrier();
    }
    let r = red_i[0];
    workgroupBarrier();
    return r;
}

// One workgroup per batch row; its threads share the outputs.
@compute @workgroup_size(64)
fn forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) lid: u32) {
    let i = wid.y * nwg.x + wid.x;
    if (i >= step.len) {
        return;
    }
    let pos = step.start + i;
    let row = order[pos];
    let inputs = shape.inputs;
    let outputs = shape.outputs;
    let x0 = row * inputs;
    let z0 = i * outputs;
    let bias0 = outputs * inputs;
    let evaluate = step.evaluate != 0u;

    // The logits, kept in `dz`; each thread reads back only those it wrote.
    var local_max = NEG_INF;
    var best_v = NEG_INF;
    var best_i = NONE;
    for (var o = lid; o < outputs; o += ROW_THREADS) {
        let w0 = o * inputs;
        var acc = 0.0;
        for (var k = 0u; k < inputs; k++) {
            acc += params[w0 + k] * features[x0 + k];
        }
        let z = params[bias0 + o] + acc;
        dz[z0 + o] = z;
        local_max = max(local_max, z);
        if (best_i == NONE || z > best_v) {
            best_v = z;
            best_i = o;
        }
    }

    if (shape.objective == 0u) {
        let label = u32(targets[row]);
        let m = reduce_max(lid, local_max);
        var local_sum = 0.0;
        for (var o = lid; o < outputs; o += ROW_THREADS) {
            let e = exp(dz[z0 + o] - m);
            if (o == label) {
                // The loss needs the label's logit: kept as z - max in the row's output
                // slot until the sum is known.
                row_out[2u * pos] = dz[z0 + o] - m;
            }
            dz[z0 + o] = e;
            local_sum += e;
        }
        let s = reduce_sum(lid, local_sum);
        for (var o = lid; o < outputs; o += ROW_THREADS) {
            var g = dz[z0 + o] / s;
            if (o == label) {
                g -= 1.0;
                row_out[2u * pos] = log(s) - row_out[2u * pos];
            }
            dz[z0 + o] = g;
        }
        if (evaluate) {
            let best = reduce_argmax(lid, best_v, best_i);
            if (lid == 0u) {
                row_out[2u * pos + 1u] = select(0.0, 1.0, best == label);
            }
        }
    } else {
        let n = f32(outputs);
        let t0 = row * outputs;
        var local_sq = 0.0;
        for (var o = lid; o < outputs; o += ROW_THREADS) {
            let e = dz[z0 + o] - targets[t0 + o];
            local_sq += e * e;
            dz[z0 + o] = 2.0 * e / n;
        }
        let sq = reduce_sum(lid, local_sq);
        if (lid == 0u) {
            row_out[2u * pos] = sq / n;
            row_out[2u * pos + 1u] = 0.0;
        }
    }
}

// 64 parameters a workgroup, each summed over the batch by 4 threads (a quarter of the
// rows each), then the step.
const PARAMS_PER_GROUP: u32 = 64u;
const SLICES: u32 = 4u;

var<workgroup> partial: array<f32, 256>;

@compute @workgroup_size(256)
fn update(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) lid: u32) {
    let j = lid % PARAMS_PER_GROUP;
    let slice = lid / PARAMS_PER_GROUP;
    let p = (wid.y * nwg.x + wid.x) * PARAMS_PER_GROUP + j;
    let inputs = shape.inputs;
    let outputs = shape.outputs;
    let weights = outputs * inputs;
    let count = weights + outputs;

    var g = 0.0;
    if (p < weights) {
        let o = p / inputs;
        let k = p % inputs;
        for (var b = slice; b < step.len; b += SLICES) {
            let d = dz[b * outputs + o] * step.scale;
            g += d * features[order[step.start + b] * inputs + k];
        }
    } else if (p < count) {
        let o = p - weights;
        for (var b = slice; b < step.len; b += SLICES) {
            g += dz[b * outputs + o] * step.scale;
        }
    }
    partial[lid] = g;
    workgroupBarrier();
    if (slice != 0u || p >= count) {
        return;
    }
    var grad = partial[j] + partial[j + 64u] + partial[j + 128u] + partial[j + 192u];
    let w = params[p];
    if (p < weights) {
        grad += shape.l2 * w;
    }
    if (shape.optimizer == 0u) {
        params[p] = w - shape.learning_rate * grad;
    } else {
        let m = shape.beta1 * moments[p] + shape.one_minus_beta1 * grad;
        let v = shape.beta2 * moments[count + p] + shape.one_minus_beta2 * grad * grad;
        moments[p] = m;
        moments[count + p] = v;
        params[p] = w - shape.learning_rate * (m / step.c1) / (sqrt(v / step.c2) + shape.epsilon);
    }
}
