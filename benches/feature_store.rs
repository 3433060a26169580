//! The offline store: ingest rate for CSV and Parquet (every row checked, one transaction,
//! synchronous = FULL) and the peak memory it takes; snapshot build time and size for a
//! million entities, and what a new snapshot moves after a few entities changed (the
//! transfer's FastCDC chunks); point-in-time export rate.
//!
//! `cargo bench --bench feature_store -- [--rows N] [--postgres]`; prints a Markdown table
//! for BENCHMARKS.md. With `--postgres` the offline store is a throwaway PostgreSQL cluster
//! (the storage tests' harness, `control-plane/tests/storage/postgres.rs`: Debian's server
//! programs, a cluster in a temporary directory, stopped when the bench ends), one database
//! per measurement, instead of SQLite files.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use arrow_array::{ArrayRef, Float32Array, RecordBatch, StringArray, TimestampMicrosecondArray};
use arrow_schema::{DataType, Field, Schema, TimeUnit};
use falaj_common::chunking::ChunkParams;
use falaj_common::features::FeatureView;
use falaj_common::keys::Sha256;
use falaj_common::sample::{self, FEATURES};
use falaj_common::time::Timestamp;
use falaj_control::db::Db;
use falaj_control::features::export;
use falaj_control::features::ingest;
use falaj_control::features::snapshot::{self, SnapshotOptions};
use falaj_control::features::store;
use falaj_control::sample::{pump_id, pump_view, write_pump_readings};
use falaj_control::sql::PgOptions;
use falaj_tables::Format;

// The storage tests' PostgreSQL cluster, for `--postgres`.
#[path = "../control-plane/tests/storage/postgres.rs"]
#[expect(dead_code, reason = "the storage tests' harness: the bench needs no TLS or roles")]
mod postgres;

const START: i64 = 1_790_000_000_000_000;
const HOUR: i64 = 3_600_000_000;
const MIB: f64 = 1024.0 * 1024.0;

/// Where the offline stores of the bench live.
enum Target<'a> {
    /// SQLite files in this directory.
    Sqlite(&'a Path),
    /// A database of its own on this cluster for each.
    Postgres(&'a postgres::Cluster),
}

/// A PostgreSQL cluster of its own, stopped when dropped.
fn start_cluster() -> Result<postgres::Cluster> {
    let bin = postgres::binaries().map_err(anyhow::Error::msg)?;
    postgres::Cluster::start(&bin).map_err(anyhow::Error::msg)
}

/// A new offline store named `name` holding the view `pump-sensors`.
fn open(target: &Target<'_>, name: &str) -> Result<Db> {
    let db = match target {
        Target::Sqlite(dir) => Db::open_with(&dir.join(name), store::MIGRATIONS)?,
        Target::Postgres(cluster) => {
            let db = Db::open_postgres(&PgOptions::new(cluster.database("")))?;
            store::migrate_postgres(&db)?;
            db
        }
    };
    let view = FeatureView::from_toml(&pump_view())?;
    db.run_sync(|sql| store::apply(&sql, &view, Timestamp::from_unix(0)).map(drop))?;
    Ok(db)
}

/// Linux's peak resident set since the last reset, in MiB.
fn peak_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn reset_peak() {
    // Writing 5 to clear_refs resets VmHWM to the current RSS (Linux 4.0+).
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn ingest_file(db: &Db, path: &Path) -> Result<(u64, f64, f64)> {
    reset_peak();
    let before = peak_mib();
    let started = Instant::now();
    let path = path.to_owned();
    let done = db.run_sync(move |sql| {
        Ok(ingest::ingest(&sql, "pump-sensors", &path, "bench", Timestamp::from_unix(0)))
    })??;
    Ok((done.rows, started.elapsed().as_secs_f64(), peak_mib() - before))
}

/// The same readings as `write_pump_readings`, as Parquet (snappy, the pandas default).
fn write_parquet(path: &Path, pumps: usize, readings: usize, seed: u64) -> Result<()> {
    let data = sample::generate(pumps * readings, seed, &[]);
    let mut fields = vec![
        Field::new("pump_id", DataType::Utf8, false),
        Field::new("event_time", DataType::Timestamp(TimeUnit::Microsecond, None), false),
        Field::new("site", DataType::Utf8, false),
        Field::new("technician", DataType::Utf8, true),
    ];
    fields.extend(FEATURES.iter().map(|f| Field::new(*f, DataType::Float32, false)));
    let schema = Arc::new(Schema::new(fields));
    let props = parquet::file::properties::WriterProperties::builder()
        .set_compression(parquet::basic::Compression::SNAPPY)
        .build();
    let mut writer = parquet::arrow::ArrowWriter::try_new(
        std::fs::File::create(path)?,
        schema.clone(),
        Some(props),
    )?;
    let batch_rows = 65_536;
    let total = pumps * readings;
    for from in (0..total).step_by(batch_rows) {
        let rows = from..(from + batch_rows).min(total);
        let (pump, hour) = (|i: usize| i % pumps, |i: usize| i / pumps);
        let mut columns: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from_iter_values(rows.clone().map(|i| pump_id(pump(i))))),
            Arc::new(TimestampMicrosecondArray::from_iter_values(
                rows.clone().map(|i| START + hour(i) as i64 * HOUR),
            )),
            Arc::new(StringArray::from_iter_values(
                rows.clone().map(|i| if pump(i) % 3 == 0 { "plant-b" } else { "plant-a" }),
            )),
            Arc::new(
                rows.clone()
                    .map(|i| ["amal", "bilal", "chen", ""][(pump(i) + hour(i)) % 4])
                    .map(|t| (!t.is_empty()).then_some(t))
                    .collect::<StringArray>(),
            ),
        ];
        for f in 0..FEATURES.len() {
            columns.push(Arc::new(Float32Array::from_iter_values(
                rows.clone().map(|i| data.row(i)[f]),
            )));
        }
        writer.write(&RecordBatch::try_new(schema.clone(), columns)?)?;
    }
    writer.close()?;
    Ok(())
}

fn chunk_set(bytes: &[u8]) -> Vec<(Sha256, usize)> {
    let p = ChunkParams::SNAPSHOTS;
    fastcdc::v2020::FastCDC::new(bytes, p.min, p.avg, p.max)
        .map(|c| (Sha256::of(&bytes[c.offset..c.offset + c.length]), c.length))
        .collect()
}

fn snapshot_of(db: &Db, as_of: i64) -> Result<(Vec<u8>, u64, f64)> {
    let started = Instant::now();
    let built = db.run_sync(move |sql| {
        Ok(snapshot::build(
            &sql,
            "pump-sensors",
            &SnapshotOptions::default(),
            &falaj_common::features::Keyring::new(1, &[9; 32]),
            as_of,
            Vec::new(),
        ))
    })?;
    let (spec, bytes) = built?;
    Ok((bytes, spec.entities, started.elapsed().as_secs_f64()))
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let rows: usize = args
        .iter()
        .position(|a| a == "--rows")
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse())
        .transpose()
        .context("--rows")?
        .unwrap_or(1_000_000);
    let dir = tempfile::tempdir()?;
    let dir = dir.path();
    let cluster = args.iter().any(|a| a == "--postgres").then(start_cluster).transpose()?;
    let target = cluster.as_ref().map_or(Target::Sqlite(dir), Target::Postgres);
    let mut table = Vec::new();

    // Ingest: rows/10 pumps, 10 hourly readings each.
    let (pumps, readings) = (rows / 10, 10);
    let csv = dir.join("readings.csv");
    write_pump_readings(&csv, pumps, readings, START, 1)?;
    let parquet = dir.join("readings.parquet");
    write_parquet(&parquet, pumps, readings, 1)?;
    let small = dir.join("small.csv");
    write_pump_readings(&small, pumps / 10, readings, START, 1)?;
    for (what, file, db) in [
        ("CSV", &csv, "csv.db"),
        ("Parquet (snappy)", &parquet, "parquet.db"),
        ("CSV, a tenth of the rows", &small, "small.db"),
    ] {
        let db = open(&target, db)?;
        let size = std::fs::metadata(file)?.len() as f64 / MIB;
        let (n, seconds, peak) = ingest_file(&db, file)?;
        table.push(format!(
            "| ingest {what}: {n} rows ({size:.0} MiB, 12 columns) | {seconds:.2} s | {:.0} rows/s | peak RSS +{peak:.0} MiB |",
            n as f64 / seconds
        ));
    }

    // Point-in-time export: 100k labels at random times over the 10 hours.
    let db = open(&target, "csv-export.db")?;
    ingest_file(&db, &csv)?;
    let labels = dir.join("labels.csv");
    let mut text = String::from("pump_id,event_time,failed\n");
    let label_rows = 100_000.min(rows);
    let mut rng = falaj_common::random::SeededRng::new(5);
    for i in 0..label_rows {
        let pump = rng.below(pumps);
        let at = START + (rng.uniform() * (10 * HOUR) as f64) as i64;
        let at = falaj_common::features::value::format_time(at);
        let _ = writeln!(text, "{},{at},{}", pump_id(pump), i % 2);
    }
    std::fs::write(&labels, text)?;
    for (format, name) in [(Format::Parquet, "train.parquet"), (Format::Csv, "train.csv")] {
        let out = dir.join(name);
        let started = Instant::now();
        let labels = labels.clone();
        let done = db.run_sync(move |sql| {
            Ok(export::export(&sql, "pump-sensors", &labels, "labels.csv", &out, format))
        })??;
        let seconds = started.elapsed().as_secs_f64();
        table.push(format!(
            "| point-in-time export to {}: {} labels against {rows} rows | {seconds:.2} s | {:.0} labels/s | {} matched |",
            format.name(),
            done.rows,
            done.rows as f64 / seconds,
            done.matched
        ));
    }

    // Snapshots of `rows` entities, one reading each; then 1% of them report again.
    let db = open(&target, "entities.db")?;
    let one = dir.join("one.csv");
    write_pump_readings(&one, rows, 1, START, 2)?;
    ingest_file(&db, &one)?;
    let (first, entities, seconds) = snapshot_of(&db, START + HOUR)?;
    let mib = first.len() as f64 / MIB;
    table.push(format!(
        "| snapshot build: {entities} entities, 12 features (technician hashed) | {seconds:.2} s | {:.0} entities/s | {mib:.1} MiB payload |",
        entities as f64 / seconds
    ));
    for (share, seed) in [(10_000, 3), (1000, 4), (100, 5)] {
        let update = dir.join(format!("update-{share}.csv"));
        // rows/share pumps report an hour later, spread evenly over the key range.
        write_pump_readings(&update, rows / share, 1, START + HOUR, seed)?;
        let spread = dir.join(format!("spread-{share}.csv"));
        spread_rows(&update, &spread, share)?;
        ingest_file(&db, &spread)?;
        let (next, _, _) = snapshot_of(&db, START + 2 * HOUR)?;
        let old: HashSet<Sha256> = chunk_set(&first).into_iter().map(|c| c.0).collect();
        let new = chunk_set(&next);
        let moved: usize = new.iter().filter(|c| !old.contains(&c.0)).map(|c| c.1).sum();
        table.push(format!(
            "| next snapshot after {}% of entities changed (spread evenly) | {} of {} chunks new | {:.1} MiB of {:.1} MiB moved | {:.1}% |",
            100.0 / share as f64,
            new.iter().filter(|c| !old.contains(&c.0)).count(),
            new.len(),
            moved as f64 / MIB,
            next.len() as f64 / MIB,
            100.0 * moved as f64 / next.len() as f64
        ));
    }

    println!("| what | time | rate | also |");
    println!("|---|---:|---:|---|");
    for row in table {
        println!("{row}");
    }
    Ok(())
}

/// Rewrites an update file so that its rows go to every `share`-th pump, spreading the
/// changes over the whole key range (the realistic case: any pump may report).
fn spread_rows(from: &Path, to: &Path, share: usize) -> Result<()> {
    let text = std::fs::read_to_string(from)?;
    let mut out = String::with_capacity(text.len());
    for (i, line) in text.lines().enumerate() {
        if i == 0 {
            out += line;
        } else {
            let (_, rest) = line.split_once(',').context("a row")?;
            let _ = write!(out, "{},{rest}", pump_id((i - 1) * share));
        }
        out.push('\n');
    }
    std::fs::write(to, out)?;
    Ok(())
}
