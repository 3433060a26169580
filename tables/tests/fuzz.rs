//! Stable fuzzing of the tabular reader as the feature store's ingest uses it: CSV and
//! Parquet files of feature rows (`falaj_tables::fuzzing::feature_rows`, the body the
//! cargo-fuzz binary in `fuzz/` runs), from the committed corpus in
//! `fuzz/seeds/feature_rows/` and files written here, then a fixed number of seeded
//! mutants. `FALAJ_FUZZ_ITERATIONS`, `FALAJ_FUZZ_SEED` and `FALAJ_BLESS` act as in
//! `common/tests/it/fuzz.rs`.

use std::path::PathBuf;
use std::sync::Arc;

use arrow_array::{ArrayRef, Float32Array, RecordBatch, StringArray, TimestampMicrosecondArray};
use falaj_common::fuzzing::Campaign;
use falaj_tables::fuzzing::feature_rows;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;

fn peak(run: &mut dyn FnMut()) -> u64 {
    allocation_counter::measure(run).bytes_max
}

/// A Parquet file of `rows` readings, compressed with `compression`.
fn parquet(rows: usize, compression: Compression) -> Vec<u8> {
    let keys: Vec<String> = (0..rows).map(|i| format!("pump-{i}")).collect();
    let times: Vec<i64> = (0..rows).map(|i| 1_700_000_000_000_000 + i as i64).collect();
    let temperatures: Vec<Option<f32>> =
        (0..rows).map(|i| (i % 3 != 0).then_some(i as f32 * 0.5)).collect();
    let modes = StringArray::from_iter_values((0..rows).map(|i| ["auto", "manual"][i % 2]));
    let columns: Vec<(&str, ArrayRef)> = vec![
        ("pump_id", Arc::new(StringArray::from(keys))),
        ("event_time", Arc::new(TimestampMicrosecondArray::from(times))),
        ("temperature", Arc::new(Float32Array::from(temperatures))),
        ("mode", Arc::new(modes)),
    ];
    let batch = RecordBatch::try_from_iter(columns).unwrap();
    let properties = WriterProperties::builder().set_compression(compression).build();
    let mut out = Vec::new();
    let mut writer = ArrowWriter::try_new(&mut out, batch.schema(), Some(properties)).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
    out
}

#[test]
fn feature_rows_in_csv_and_parquet() {
    let mut generated: Vec<Vec<u8>> = [
        "pump_id,event_time,temperature,mode\npump-1,2026-11-30T12:00:00Z,21.5,auto\n\
         pump-2,2026-11-30T12:00:01Z,,manual\n",
        "event_time,pump_id,mode\n2026-11-30T12:00:00.5Z,\"p,1\",auto\r\n",
        // Rows that break rules are read, and reported, not refused.
        "pump_id,event_time,temperature,mode\n,yesterday,hot,other\n",
    ]
    .iter()
    .map(|t| t.as_bytes().to_vec())
    .collect();
    generated.push(parquet(3, Compression::UNCOMPRESSED));
    generated.push(parquet(20, Compression::SNAPPY));
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/feature_rows");
    if std::env::var_os("FALAJ_BLESS").is_some() {
        std::fs::create_dir_all(&dir).unwrap();
        for (i, seed) in generated.iter().enumerate() {
            std::fs::write(dir.join(format!("gen-{i}")), seed).unwrap();
        }
    }
    for (i, seed) in generated.iter().enumerate() {
        assert!(feature_rows(seed), "generated seed {i} was refused");
    }
    Campaign::new("feature_rows", 10000)
        .corpus(&dir)
        .seeds(generated)
        .memory(peak, 32 << 20)
        .run(feature_rows);
}
