//! The fuzz target of feature rows (feature `fuzzing`, test support): any bytes as a CSV
//! or Parquet file of the fixed feature view of `falaj_common::fuzzing::targets`, read
//! a row at a time and each row checked as the control plane's ingest checks it. Called
//! by the cargo-fuzz binary in `fuzz/` and by the stable campaign in `tests/fuzz.rs`.

use std::path::Path;

use falaj_common::features::{Cell, HeaderError, Report, RowSchema};
use falaj_common::fuzzing::targets;

use crate::{Format, RowSink, read_bytes};

/// The ingest's checks, without the store.
#[derive(Default)]
struct Ingest {
    schema: Option<RowSchema>,
    report: Report,
}

impl RowSink for Ingest {
    type Error = HeaderError;

    fn header(&mut self, names: &[&str]) -> Result<(), HeaderError> {
        self.schema = Some(RowSchema::new(targets::view(), names)?);
        Ok(())
    }

    fn row(&mut self, number: u64, cells: &[Cell<'_>]) -> Result<(), HeaderError> {
        let schema = self.schema.as_ref().expect("the header comes first");
        if let Err(errors) = schema.check(number, cells) {
            self.report.add(errors);
        }
        Ok(())
    }
}

/// Any bytes as a file of feature rows: Parquet when it starts with `PAR1`, else CSV.
/// Returns whether the file read to its end.
pub fn feature_rows(data: &[u8]) -> bool {
    let format = if data.starts_with(b"PAR1") { Format::Parquet } else { Format::Csv };
    read_bytes(data, Path::new("rows"), format, &mut Ingest::default()).is_ok()
}
