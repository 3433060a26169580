// An activation alone: out[i] = act(x[i]).
// p: n

@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

fn element(i: u32) {
    out[i] = act(x[i]);
}
