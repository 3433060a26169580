// The index of the first (or, with last = 1, the last) maximum along one axis of a tensor
// seen as [outer, len, inner], written as a float (exact below 2^24) and cast to int64 by
// the engine.
// p: rows (outer * inner), len, inner, last

@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

fn element(row: u32) {
    let len = p[1];
    let inner = p[2];
    let base = (row / inner) * len * inner + row % inner;
    var best = x[base];
    var index = 0u;
    for (var j = 1u; j < len; j++) {
        let v = x[base + j * inner];
        if (v > best || (p[3] != 0u && v == best)) {
            best = v;
            index = j;
        }
    }
    out[row] = f32(index);
}
