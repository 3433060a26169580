// The entry point of the kernels that run one invocation per element (or row): p[0] is
// the count, and the dispatch may be folded into two dimensions (a dimension holds at
// most 65535 workgroups). Each such kernel defines `element`.

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = (wid.y * nwg.x + wid.x) * 256u + lid;
    if (i < p[0]) {
        element(i);
    }
}
