// 2-D max or average pool (1-D runs with H = 1), one invocation per output element.
// p: total, H, W, OH, OW, KH, KW, SH, SW, PT, PL, PB, PR, DH, DW, kind
// kind: 0 max, 1 average over the valid positions, 2 average over the padded window.

@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

fn element(i: u32) {
    let h = i32(p[1]);
    let w = i32(p[2]);
    let oh = p[3];
    let ow = p[4];
    let plane = i / (oh * ow);
    let y = i32((i / ow) % oh);
    let xo = i32(i % ow);
    let kind = p[15];
    var best = -3.4028235e38;
    var sum = 0.0;
    var count = 0u;
    var padded = 0u;
    for (var ky = 0; ky < i32(p[5]); ky++) {
        let iy = y * i32(p[7]) - i32(p[9]) + ky * i32(p[13]);
        for (var kx = 0; kx < i32(p[6]); kx++) {
            let ix = xo * i32(p[8]) - i32(p[10]) + kx * i32(p[14]);
            let inside_pads = iy < h + i32(p[11]) && ix < w + i32(p[12]);
            if (inside_pads) {
                padded++;
            }
            if (iy >= 0 && iy < h && ix >= 0 && ix < w) {
                let v = x[plane * u32(h * w) + u32(iy * w + ix)];
                best = max(best, v);
                sum += v;
                count++;
            }
        }
    }
    if (kind == 0u) {
        out[i] = best;
    } else if (kind == 1u) {
        out[i] = sum / f32(max(count, 1u));
    } else {
        out[i] = sum / f32(max(padded, 1u));
    }
}
