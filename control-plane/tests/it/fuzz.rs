//! Stable fuzzing of the control plane's configuration file (`ControlConfig::parse`): the
//! shipped `control.toml`, the same with every documented default written out, and the
//! committed corpus in `fuzz/seeds/control_config/`, then a fixed number of seeded
//! mutants (the runner of `falaj_common::fuzzing`). The control plane's other decoders of
//! outside bytes (protocol frames, metric windows, audit lines, feature views and rows,
//! bundles, trust roots) are fuzzed where they live, in `common` and `tables`.
//! `FALAJ_FUZZ_ITERATIONS`, `FALAJ_FUZZ_SEED` and `FALAJ_BLESS` act as in
//! `common/tests/it/fuzz.rs`.

use std::path::{Path, PathBuf};

use falaj_common::fuzzing::Campaign;
use falaj_control::config::ControlConfig;

fn peak(run: &mut dyn FnMut()) -> u64 {
    allocation_counter::measure(run).bytes_max
}

/// Any text as the control plane's configuration; one accepted yields its settings.
fn control_config(data: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(data) else { return false };
    let Ok(config) = ControlConfig::parse(text, Path::new("control.toml")) else { return false };
    let _ = config.serve();
    true
}

#[test]
fn control_config_files() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let shipped = std::fs::read_to_string(root.join("packaging/control-plane/control.toml"));
    let shipped = shipped.unwrap();
    // Every `# key = value` and `# [[table]]` written out, but for `key = []` where the
    // file shows an example `[[...key]]` instead.
    let example = |key: &str| shipped.contains(&format!(".{key}]]"));
    let written: String = shipped
        .lines()
        .map(|line| match line.strip_prefix("# ") {
            Some(kv) if kv.starts_with("[[") => kv,
            Some(kv) => match kv.split_once(" = ") {
                Some((k, v)) if !k.contains(' ') && (v != "[]" || !example(k)) => kv,
                _ => line,
            },
            None => line,
        })
        .flat_map(|line| [line, "\n"])
        .collect();
    let generated = [shipped.into_bytes(), written.into_bytes()];
    let dir = root.join("fuzz/seeds/control_config");
    if std::env::var_os("FALAJ_BLESS").is_some() {
        std::fs::create_dir_all(&dir).unwrap();
        for (i, seed) in generated.iter().enumerate() {
            std::fs::write(dir.join(format!("gen-{i}")), seed).unwrap();
        }
    }
    for (i, seed) in generated.iter().enumerate() {
        assert!(control_config(seed), "generated seed {i} was refused");
    }
    Campaign::new("control_config", 5000)
        .corpus(&dir)
        .seeds(generated)
        .memory(peak, 32 << 20)
        .run(control_config);
}
