// Softmax or log-softmax along one axis of a tensor seen as [outer, len, inner]; one
// invocation a row. The maximum is subtracted first, so large inputs do not overflow.
// p: rows (outer * inner), len, inner

@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

fn element(row: u32) {
    let len = p[1];
    let inner = p[2];
    let base = (row / inner) * len * inner + row % inner;
    var m = x[base];
    for (var j = 1u; j < len; j++) {
        m = max(m, x[base + j * inner]);
    }
    var s = 0.0;
    for (var j = 0u; j < len; j++) {
        s += exp(x[base + j * inner] - m);
    }
    let log_s = log(s);
    for (var j = 0u; j < len; j++) {
        let shifted = x[base + j * inner] - m;
        out[base + j * inner] = select(exp(shifted) / s, shifted - log_s, LOG);
    }
}
