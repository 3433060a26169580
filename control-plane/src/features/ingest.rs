//! Ingest: every row of a CSV or Parquet file checked against the view's current
//! definition and written in one transaction, or, if any row breaks a rule, nothing written
//! and a report of the first errors. The file streams; memory does not grow with it. On
//! SQLite rows go through one prepared statement (cached by the connection) each; on
//! PostgreSQL, where a statement is a round trip, a few thousand at a time
//! ([`super::batch`]), with the same outcome: the last row for an (entity, time) wins. On
//! PostgreSQL the ingest holds the view's lock ([`store::lock_view`]), so ingests into one
//! view follow each other as on SQLite.

use std::path::Path;

use falaj_common::features::rows::RowError;
use falaj_common::features::{Cell, HeaderError, Report, RowSchema};
use falaj_common::time::Timestamp;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::batch::Batch;
use super::store::{self, Bound, StoredView};
use crate::sql::{AsSql, Backend, Param, Sql, SqlError, params};
use falaj_tables::{self as source, Format, ReadError, RowSink, SourceError};

/// Why an ingest wrote nothing.
#[derive(Debug, Error)]
pub enum IngestError {
    /// No view of that name.
    #[error("no feature view {0:?}")]
    UnknownView(String),
    /// The file could not be read.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The file's columns do not fit the view.
    #[error("{file} does not fit view {view:?}: {error}")]
    Header {
        /// The file's name as given.
        file: String,
        view: String,
        error: HeaderError,
    },
    /// Rows broke rules: nothing was written.
    #[error("{file}: {} of {} rows break the rules of view {view:?}; nothing was ingested (first: {})", report.bad_rows, report.rows, first(report))]
    Rows {
        /// The file's name as given.
        file: String,
        view: String,
        /// The first errors and the counts.
        report: Report,
    },
    /// The offline store failed.
    #[error("offline store: {0}")]
    Store(#[from] SqlError),
}

impl IngestError {
    /// Whether the offline store's disk is full (nothing was written; the same file
    /// ingests once space returns): SQLite's `SQLITE_FULL`, PostgreSQL's `53100`.
    pub fn is_storage_full(&self) -> bool {
        match self {
            Self::Store(SqlError::Sqlite(rusqlite::Error::SqliteFailure(e, _))) => {
                e.code == rusqlite::ErrorCode::DiskFull
            }
            Self::Store(SqlError::Postgres(e)) => {
                e.code() == Some(&postgres::error::SqlState::DISK_FULL)
            }
            _ => false,
        }
    }
}

fn first(report: &Report) -> String {
    report.first.first().map(RowError::to_string).unwrap_or_default()
}

/// What an ingest wrote.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ingested {
    /// The ingest's id (stored with each row).
    pub id: i64,
    pub view: String,
    /// The view version the rows were written to.
    pub version: u64,
    /// Rows written (a row for an (entity, time) already stored replaces it).
    pub rows: u64,
}

struct Writer<'c> {
    schema: Option<RowSchema>,
    stored: &'c StoredView,
    sql: Sql<'c>,
    insert: String,
    id: i64,
    report: Report,
    values: Vec<Bound>,
    /// On PostgreSQL, the rows not yet written.
    batch: Option<Batch>,
}

enum Refusal {
    Header(HeaderError),
    Store(SqlError),
}

impl RowSink for Writer<'_> {
    type Error = Refusal;

    fn header(&mut self, names: &[&str]) -> Result<(), Refusal> {
        self.schema = Some(RowSchema::new(&self.stored.view, names).map_err(Refusal::Header)?);
        Ok(())
    }

    fn row(&mut self, number: u64, cells: &[Cell<'_>]) -> Result<(), Refusal> {
        let schema = self.schema.as_ref().expect("the header comes first");
        self.report.rows = number;
        match schema.check(number, cells) {
            Err(errors) => self.report.add(errors),
            // After the first bad row nothing more is written: the transaction is rolled
            // back, and the rest of the file is only checked, for the report.
            Ok(row) if self.report.bad_rows == 0 => {
                let features = &self.stored.view.features;
                if let Some(batch) = &mut self.batch {
                    let values =
                        row.values.iter().zip(features).map(|(v, f)| store::sql_value(v, &f.kind));
                    return batch
                        .push(&self.sql, &row.key, row.time, values)
                        .map_err(Refusal::Store);
                }
                self.values.clear();
                self.values.push(store::sql_key(&row.key));
                self.values.push(Bound::Int(Some(row.time)));
                self.values.push(Bound::Int(Some(self.id)));
                self.values.extend(
                    row.values.iter().zip(features).map(|(v, f)| store::sql_value(v, &f.kind)),
                );
                let params: Vec<&dyn Param> = self.values.iter().map(Bound::param).collect();
                self.sql.execute(&self.insert, &params).map_err(Refusal::Store)?;
            }
            Ok(_) => {}
        }
        Ok(())
    }
}

/// Ingests `path` (named `file` in reports) into the current version of view `view`: one
/// transaction (a savepoint inside one), rolled back whole when any row is refused.
pub fn ingest<C: AsSql + ?Sized>(
    conn: &C,
    view: &str,
    path: &Path,
    file: &str,
    now: Timestamp,
) -> Result<Ingested, IngestError> {
    let format = Format::detect(path)?;
    crate::crash_point("ingest-staged");
    let sql = conn.sql();
    let tx = sql.transaction_immediate()?;
    store::lock_view(&tx, view, true)?;
    let stored =
        store::current(&*tx, view)?.ok_or_else(|| IngestError::UnknownView(view.to_owned()))?;
    let id: i64 = tx.query_row(
        "INSERT INTO ingests (view, version, at, source, format, rows)
         VALUES ($1, $2, $3, $4, $5, 0) RETURNING id",
        params![view, stored.version as i64, crate::db::ts(now), file, format.name()],
        |r| r.get(0),
    )?;
    let columns = store::feature_columns(&stored.view);
    let marks = (1..=stored.view.features.len() + 3).map(|i| format!("${i}")).collect::<Vec<_>>();
    // A row for an (entity, time) already stored replaces it.
    let updates = std::iter::once("ingest".to_owned())
        .chain(stored.view.features.iter().map(|f| format!("\"{}\"", f.name)))
        .map(|c| format!("{c} = excluded.{c}"))
        .collect::<Vec<_>>()
        .join(", ");
    let insert = format!(
        "INSERT INTO {} (entity, event_time, ingest, {columns}) VALUES ({})
         ON CONFLICT (entity, event_time) DO UPDATE SET {updates}",
        stored.table(tx.backend()),
        marks.join(", ")
    );
    let rows = {
        let mut writer = Writer {
            schema: None,
            stored: &stored,
            sql: *tx,
            insert,
            id,
            report: Report::default(),
            values: Vec::new(),
            batch: (tx.backend() == Backend::Postgres).then(|| Batch::new(&stored, id)),
        };
        let read = source::read(path, format, &mut writer);
        let name = || file.to_owned();
        match read {
            Err(ReadError::Source(e)) => return Err(e.into()),
            Err(ReadError::Sink(Refusal::Header(error))) => {
                return Err(IngestError::Header { file: name(), view: view.to_owned(), error });
            }
            Err(ReadError::Sink(Refusal::Store(e))) => return Err(e.into()),
            Ok(_) if writer.report.bad_rows > 0 => {
                return Err(IngestError::Rows {
                    file: name(),
                    view: view.to_owned(),
                    report: writer.report,
                });
            }
            Ok(rows) => {
                if let Some(batch) = &mut writer.batch {
                    batch.flush(&tx)?;
                }
                rows
            }
        }
    };
    tx.execute("UPDATE ingests SET rows = $1 WHERE id = $2", params![rows as i64, id])?;
    crate::crash_point("ingest-rows-written");
    // On PostgreSQL this releases a savepoint: the caller's `Db::run` commits after.
    tx.commit()?;
    crate::crash_point("ingest-committed");
    Ok(Ingested { id, view: view.to_owned(), version: stored.version, rows })
}
