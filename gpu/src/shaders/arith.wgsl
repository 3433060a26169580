// Broadcasting arithmetic: out[i] = act(a[ia] OP b[ib]), indices from six padded
// dimensions with per-operand strides (0 where the operand broadcasts).
// p: n, dims[6], a_strides[6], b_strides[6]

@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

fn element(i: u32) {
    var rest = i;
    var ia = 0u;
    var ib = 0u;
    for (var d = 6u; d > 0u; d--) {
        let size = p[d];
        let c = rest % size;
        rest = rest / size;
        ia += c * p[6u + d];
        ib += c * p[12u + d];
    }
    let x = a[ia];
    let y = b[ib];
    out[i] = act(OPERATION);
}
