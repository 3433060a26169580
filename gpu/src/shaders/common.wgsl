// Shared by every kernel: the parameter block and the fused activation.

@group(0) @binding(0) var<storage, read> p: array<u32>;

fn pf(i: u32) -> f32 {
    return bitcast<f32>(p[i]);
}

fn act(x: f32) -> f32 {
    return ACTIVATION;
}

