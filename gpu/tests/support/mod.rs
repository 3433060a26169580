//! What the GPU tests share: the adapter (lavapipe where there is no GPU).

use std::sync::Arc;

use falaj_gpu::{Gpu, GpuOptions};

/// The machine's GPU, a software one accepted. Without any, the test is skipped with a
/// loud message, unless `FALAJ_REQUIRE_GPU=1` (CI installs lavapipe and sets it).
pub fn open_gpu() -> Option<Arc<Gpu>> {
    match Gpu::open(GpuOptions { allow_software: true }) {
        Ok(gpu) => Some(gpu),
        Err(e) if std::env::var_os("FALAJ_REQUIRE_GPU").is_some() => {
            panic!("FALAJ_REQUIRE_GPU is set but {e}")
        }
        Err(e) => {
            eprintln!(
                "\n*** SKIPPED: {e}. Install mesa-vulkan-drivers to run the GPU engine's tests. ***\n"
            );
            None
        }
    }
}
