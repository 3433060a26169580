//! Any text as a feature view declaration, and then as a snapshot filter over it: each is
//! parsed or refused with an error, never a panic.
#![no_main]

use falaj_common::features::{Filter, FeatureView};
use libfuzzer_sys::fuzz_target;

const VIEW: &str = r#"
name = "pumps"
timestamp = "event_time"
entity = { name = "pump_id", type = "string" }

[[features]]
name = "temperature"
type = "f32"
description = "d"
owner = "o"

[[features]]
name = "mode"
type = "category"
values = ["auto", "manual"]
description = "d"
owner = "o"
"#;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = FeatureView::from_toml(text);
    let view = FeatureView::from_toml(VIEW).expect("fixed view");
    let _ = Filter::parse(&view, text);
});
