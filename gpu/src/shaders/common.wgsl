// Shared by every kernel: the parameter block, the fused activation and the index of an
// invocation in a dispatch that may be folded into two dimensions (a dimension holds at
// most 65535 workgroups).

@group(0) @binding(0) var<storage, read> p: array<u32>;

fn pf(i: u32) -> f32 {
    return bitcast<f32>(p[i]);
}

fn act(x: f32) -> f32 {
    return ACTIVATION;
}

fn linear(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.y * nwg.x + wid.x) * 256u + lid;
}
