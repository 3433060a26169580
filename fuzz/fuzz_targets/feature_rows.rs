//! Any bytes as a CSV or Parquet file of feature rows, checked as the ingest checks them.
//!
//! The body, `falaj_tables::fuzzing::feature_rows`, is the stable test's too.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    falaj_tables::fuzzing::feature_rows(data);
});
