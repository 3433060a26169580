// A strided copy over up to six dimensions: transposes, and each input of a Concat.
// p: n, dst_offset, dims[6], src_strides[6], dst_strides[6]

@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

fn element(i: u32) {
    var rest = i;
    var src = 0u;
    var dst = p[1];
    for (var d = 6u; d > 0u; d--) {
        let size = p[1u + d];
        let c = rest % size;
        rest = rest / size;
        src += c * p[7u + d];
        dst += c * p[13u + d];
    }
    out[dst] = x[src];
}
