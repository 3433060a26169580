// A 2-D convolution computed directly, one invocation per output: for convolutions with
// few output channels per group (depthwise ones, say), where a GEMM tile would sit idle.
// p: total, C_in, H, W, OH, OW, KH, KW, SH, SW, PH, PW, DH, DW, C_out, ICg, OCg, has_bias

@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

fn element(i: u32) {
    let h = i32(p[2]);
    let wd = i32(p[3]);
    let ohw = p[4] * p[5];
    let oc = (i / ohw) % p[14];
    let image = i / (ohw * p[14]);
    let oy = i32((i % ohw) / p[5]);
    let ox = i32(i % p[5]);
    let icg = p[15];
    let group = oc / p[16];
    let kh = p[6];
    let kw = p[7];
    var sum = 0.0;
    if (p[17] != 0u) {
        sum = bias[oc];
    }
    for (var ic = 0u; ic < icg; ic++) {
        let plane = (image * p[1] + group * icg + ic) * u32(h * wd);
        let weights = (oc * icg + ic) * kh * kw;
        for (var ky = 0u; ky < kh; ky++) {
            let iy = oy * i32(p[8]) - i32(p[10]) + i32(ky * p[12]);
            if (iy < 0 || iy >= h) {
                continue;
            }
            for (var kx = 0u; kx < kw; kx++) {
                let ix = ox * i32(p[9]) - i32(p[11]) + i32(kx * p[13]);
                if (ix >= 0 && ix < wd) {
                    sum = fma(x[plane + u32(iy * wd + ix)], w[weights + ky * kw + kx], sum);
                }
            }
        }
    }
    out[i] = act(sum);
}
