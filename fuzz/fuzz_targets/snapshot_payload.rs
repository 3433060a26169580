//! Any bytes as a snapshot payload for a fixed manifest: the loader returns a table or an
//! error naming the row, never panics, and a table it returns answers lookups.
#![no_main]

use std::sync::OnceLock;

use falaj_common::features::{FeatureView, OnlineTable, SnapshotSpec, pii};
use falaj_common::features::view::PiiPolicy;
use falaj_common::time::Timestamp;
use libfuzzer_sys::fuzz_target;

const VIEW: &str = r#"
name = "pumps"
timestamp = "event_time"
entity = { name = "pump_id", type = "string" }

[[features]]
name = "temperature"
type = "f32"
nullable = true
description = "d"
owner = "o"
default = 20.0

[[features]]
name = "mode"
type = "category"
values = ["auto", "manual"]
description = "d"
owner = "o"
"#;

fn spec() -> &'static SnapshotSpec {
    static SPEC: OnceLock<SnapshotSpec> = OnceLock::new();
    SPEC.get_or_init(|| {
        let view = FeatureView::from_toml(VIEW).expect("fixed view");
        let plan = pii::plan(&view, Some(PiiPolicy::Drop)).expect("no personal data");
        SnapshotSpec::new(&view, 1, &plan, Timestamp::from_unix(0), "all")
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&count, payload)) = data.split_first() else { return };
    let mut spec = spec().clone();
    spec.entities = u64::from(count);
    if let Ok(table) = OnlineTable::load(spec, payload) {
        let _ = table.get("pump-1");
        let mut out = Vec::new();
        let _ = table.assemble("pump-1", &[0], &mut out);
    }
});
