// Inference batch normalization over axis 1 of a tensor seen as [N, C, inner].
// p: n, C, inner, epsilon

@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> scale: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read> mean: array<f32>;
@group(0) @binding(5) var<storage, read> variance: array<f32>;
@group(0) @binding(6) var<storage, read_write> out: array<f32>;

fn element(i: u32) {
    let c = (i / p[2]) % p[1];
    let s = scale[c] / sqrt(variance[c] + pf(3u));
    out[i] = act((x[i] - mean[c]) * s + bias[c]);
}
