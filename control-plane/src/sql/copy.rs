//! Copying a SQLite database of the control plane into PostgreSQL, for
//! `falaj-control migrate --from-sqlite DIR --to postgres://...`.
//!
//! The copy follows the schemas rather than a list of its own: every table of the SQLite
//! database (brought to this version's schema first, as `serve` would) is copied into the
//! table of the same name in PostgreSQL (migrated to this version's schema by
//! [`crate::db::Db::open_postgres`]), column by column by name, each value converted to
//! the PostgreSQL column's type (`BIGINT`, `DOUBLE PRECISION`, `TEXT`, `BYTEA`) or refused,
//! naming the table, column and row. Tables go in the order their foreign keys need;
//! identity columns' sequences are moved past the highest id copied, so new rows do not
//! collide with copied ones.
//!
//! The target must hold no rows: the copy is one PostgreSQL transaction, and it is
//! committed only when, for every table, the rows read back from PostgreSQL match the rows
//! read from SQLite: the same count and the same [`TableDigest`] (a sum of each row's
//! SHA-256, so that the two sides may return rows in different orders). A refused or
//! failed copy leaves the target as it was. The source is read in one read transaction,
//! so a control plane still running against it would not tear the copy, but its writes
//! after that point would not be copied: stop it first.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use rusqlite::types::ValueRef;
use thiserror::Error;

use super::{Param, Sql, SqlError};
use crate::db::Db;

/// Rows sent in one `INSERT` (PostgreSQL binds at most 65,535 parameters a statement).
const PARAMS_PER_INSERT: usize = 8_192;

/// Rows read back from PostgreSQL at a time, through a cursor.
const ROWS_PER_FETCH: usize = 10_000;

/// Why a copy was refused or failed; the target is left as it was.
#[derive(Debug, Error)]
pub enum CopyError {
    /// The target already holds rows.
    #[error(
        "the PostgreSQL database already holds data ({rows} rows in {table}): migrate into an empty database"
    )]
    NotEmpty {
        /// The first table found with rows.
        table: String,
        /// How many.
        rows: i64,
    },
    /// A table of the source has no counterpart in the target's schema.
    #[error(
        "table {table} is in the SQLite database but not in PostgreSQL's schema: is this falaj-control older than the data directory?"
    )]
    MissingTable {
        /// The table.
        table: String,
    },
    /// A column of the source has no counterpart in the target's table.
    #[error("column {table}.{column} is in the SQLite database but not in PostgreSQL's schema")]
    MissingColumn {
        /// The table.
        table: String,
        /// The column.
        column: String,
    },
    /// A target column's type is not one the control plane's schema uses.
    #[error("column {table}.{column} has PostgreSQL type {pg_type}, which the copy does not know")]
    UnknownType {
        /// The table.
        table: String,
        /// The column.
        column: String,
        /// Its type, as `information_schema` names it.
        pg_type: String,
    },
    /// The tables' foreign keys form a cycle, so no order of insertion satisfies them.
    #[error("the foreign keys of tables {0} form a cycle")]
    Cycle(String),
    /// A value cannot be held by its target column.
    #[error("{table}.{column}, row {row} of the SQLite table: {problem}")]
    Value {
        /// The table.
        table: String,
        /// The column.
        column: String,
        /// The row's position in the source table, from 1.
        row: u64,
        /// What was wrong.
        problem: String,
    },
    /// The rows read back from PostgreSQL differ from those read from SQLite.
    #[error(
        "{table}: SQLite holds {source_rows} rows (digest {source_digest}), PostgreSQL {target_rows} (digest {target_digest}) after the copy; nothing was committed"
    )]
    Mismatch {
        /// The table.
        table: String,
        /// Rows in SQLite.
        source_rows: u64,
        /// Their digest.
        source_digest: TableDigest,
        /// Rows read back from PostgreSQL.
        target_rows: u64,
        /// Their digest.
        target_digest: TableDigest,
    },
    /// The source database failed.
    #[error("reading the SQLite database: {0}")]
    Source(#[from] rusqlite::Error),
    /// The target database failed.
    #[error(transparent)]
    Target(#[from] SqlError),
    /// Either database could not be opened or reached.
    #[error(transparent)]
    Database(#[from] crate::db::DbError),
}

/// What was copied of one table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableCopy {
    /// The table.
    pub table: String,
    /// Its rows, the same count on both sides.
    pub rows: u64,
    /// Their digest, the same on both sides.
    pub digest: TableDigest,
}

/// An order-independent digest of a table's rows: the sum, in four 64-bit lanes modulo
/// 2^64, of each row's SHA-256 over its values' canonical encoding (type, length, bytes).
/// Equal multisets of rows give equal digests whatever order they are read in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TableDigest([u64; 4]);

impl TableDigest {
    fn add(&mut self, row: &[u8]) {
        let sha = ring::digest::digest(&ring::digest::SHA256, row);
        for (lane, chunk) in self.0.iter_mut().zip(sha.as_ref().chunks_exact(8)) {
            let word = u64::from_le_bytes(chunk.try_into().expect("chunks of eight"));
            *lane = lane.wrapping_add(word);
        }
    }
}

impl fmt::Display for TableDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|lane| write!(f, "{lane:016x}"))
    }
}

/// A PostgreSQL column type the schema uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Integer,
    Real,
    Text,
    Bytes,
}

impl Kind {
    fn of(pg_type: &str) -> Option<Self> {
        match pg_type {
            "bigint" | "integer" | "smallint" => Some(Self::Integer),
            "double precision" | "real" => Some(Self::Real),
            "text" | "character varying" => Some(Self::Text),
            "bytea" => Some(Self::Bytes),
            _ => None,
        }
    }
}

/// One value converted to its target column's type.
#[derive(Debug)]
enum Cell {
    Integer(Option<i64>),
    Real(Option<f64>),
    Text(Option<String>),
    Bytes(Option<Vec<u8>>),
}

impl Cell {
    fn param(&self) -> &dyn Param {
        match self {
            Cell::Integer(v) => v,
            Cell::Real(v) => v,
            Cell::Text(v) => v,
            Cell::Bytes(v) => v,
        }
    }

    /// Appends the canonical encoding hashed into a [`TableDigest`].
    fn encode(&self, out: &mut Vec<u8>) {
        let bytes = |out: &mut Vec<u8>, tag: u8, b: &[u8]| {
            out.push(tag);
            out.extend_from_slice(&(b.len() as u64).to_le_bytes());
            out.extend_from_slice(b);
        };
        match self {
            Cell::Integer(None) | Cell::Real(None) | Cell::Text(None) | Cell::Bytes(None) => {
                out.push(0);
            }
            Cell::Integer(Some(v)) => bytes(out, 1, &v.to_le_bytes()),
            Cell::Real(Some(v)) => bytes(out, 2, &v.to_bits().to_le_bytes()),
            Cell::Text(Some(v)) => bytes(out, 3, v.as_bytes()),
            Cell::Bytes(Some(v)) => bytes(out, 4, v),
        }
    }

    /// A SQLite value as a `kind` column holds it, or what is wrong with it.
    fn from_sqlite(value: ValueRef<'_>, kind: Kind) -> Result<Self, String> {
        Ok(match (kind, value) {
            (Kind::Integer, ValueRef::Null) => Cell::Integer(None),
            (Kind::Real, ValueRef::Null) => Cell::Real(None),
            (Kind::Text, ValueRef::Null) => Cell::Text(None),
            (Kind::Bytes, ValueRef::Null) => Cell::Bytes(None),
            (Kind::Integer, ValueRef::Integer(v)) => Cell::Integer(Some(v)),
            (Kind::Real, ValueRef::Real(v)) => Cell::Real(Some(v)),
            // SQLite keeps a whole REAL as an INTEGER in some columns; the value is the same.
            (Kind::Real, ValueRef::Integer(v)) => Cell::Real(Some(v as f64)),
            (Kind::Text, ValueRef::Text(v) | ValueRef::Blob(v)) => {
                Cell::Text(Some(String::from_utf8(v.to_vec()).map_err(|e| {
                    format!("text that is not UTF-8 ({e}), which a TEXT column cannot hold")
                })?))
            }
            (Kind::Bytes, ValueRef::Blob(v) | ValueRef::Text(v)) => Cell::Bytes(Some(v.to_vec())),
            (kind, value) => {
                return Err(format!(
                    "a {:?} value, which a {kind:?} column cannot hold",
                    value.data_type()
                ));
            }
        })
    }

    /// Column `idx` of a PostgreSQL row, read as `kind`.
    fn from_row(row: &super::Row<'_>, idx: usize, kind: Kind) -> Result<Self, SqlError> {
        Ok(match kind {
            Kind::Integer => Cell::Integer(row.get(idx)?),
            Kind::Real => Cell::Real(row.get(idx)?),
            Kind::Text => Cell::Text(row.get(idx)?),
            Kind::Bytes => Cell::Bytes(row.get(idx)?),
        })
    }
}

/// A table to copy: its name in the source and in the target, its columns (in the
/// source's order) with their target types, and the target's identity columns.
struct Table {
    name: String,
    target: String,
    columns: Vec<(String, Kind)>,
    identity: Vec<String>,
}

impl Table {
    fn column_list(&self) -> String {
        self.columns.iter().map(|(c, _)| quoted(c)).collect::<Vec<_>>().join(", ")
    }
}

/// Makes, on the target, tables its schema does not make itself (the feature store's, one
/// per view version, made as views are applied) from what the source holds; returns each
/// such table's name in the source with its name in the target.
pub type Prepare =
    fn(source: &Sql<'_>, target: &Sql<'_>) -> Result<Vec<(String, String)>, SqlError>;

/// Copies every table of the SQLite databases `sources` (each with its [`Prepare`], if it
/// needs one) into the PostgreSQL database
/// `target` in one transaction, committed only when what PostgreSQL holds afterwards
/// matches; returns each table's count and digest, in the order copied.
pub fn copy_databases(
    sources: &[(&Db, Option<Prepare>)],
    target: &Db,
) -> Result<Vec<TableCopy>, CopyError> {
    target.run_sync(|sql| {
        // A savepoint: a refused copy rolls back to it, and the (empty) transaction around
        // it commits, so the refusal reaches the caller as itself.
        let tx = sql.transaction()?;
        let mut copied = Vec::new();
        for &(source, prepare) in sources {
            match source.call_sync(|conn| Ok(copy_sqlite_into(conn, &tx, prepare))) {
                Ok(Ok(tables)) => copied.extend(tables),
                Ok(Err(refused)) => return Ok(Err(refused)),
                Err(failed) => return Ok(Err(failed.into())),
            }
        }
        tx.commit()?;
        // Statistics for the planner now, not at autovacuum's next pass: a plan made for
        // tables it takes to be empty scans them whole.
        sql.execute_batch("ANALYZE")?;
        Ok(Ok(copied))
    })?
}

/// Copies every table of `source` into `target` (within a transaction the caller commits)
/// and checks what PostgreSQL holds afterwards.
fn copy_sqlite_into(
    source: &mut rusqlite::Connection,
    target: &Sql<'_>,
    prepare: Option<Prepare>,
) -> Result<Vec<TableCopy>, CopyError> {
    // One read transaction: a consistent view of the source for the whole copy.
    let source = source.transaction()?;
    let names: Vec<String> = source
        .prepare(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name",
        )?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    // Every table the target's schema has must be empty (before anything is made there).
    // Names are compared as text: one past 63 bytes is no identifier, and refused as one.
    for name in &names {
        let exists: i64 = target.query_row(
            "SELECT COUNT(*) FROM information_schema.tables
             WHERE table_schema = current_schema() AND table_name = CAST($1 AS TEXT)",
            super::params![name.clone()],
            |r| r.get(0),
        )?;
        if exists == 0 {
            continue;
        }
        let rows: i64 =
            target
                .query_row(&format!("SELECT COUNT(*) FROM {}", quoted(name)), &[], |r| r.get(0))?;
        if rows > 0 {
            return Err(CopyError::NotEmpty { table: name.clone(), rows });
        }
    }
    let renames: BTreeMap<String, String> = match prepare {
        Some(prepare) => prepare(&Sql::sqlite(&source), target)?.into_iter().collect(),
        None => BTreeMap::new(),
    };
    let tables = tables_in_order(&source, target, &names, &renames)?;
    let mut copied = Vec::with_capacity(tables.len());
    for table in &tables {
        let (rows, digest) = copy_table(&source, target, table)?;
        for column in &table.identity {
            // The next id after the highest copied (or 1 for an empty table).
            target.query_row(
                &format!(
                    "SELECT setval(pg_get_serial_sequence($1, $2), COALESCE(MAX({c}), 0) + 1, false) FROM {t}",
                    c = quoted(column),
                    t = quoted(&table.target),
                ),
                super::params![quoted(&table.target), column.clone()],
                |r| r.get::<i64>(0),
            )?;
        }
        let (target_rows, target_digest) = read_back(target, table)?;
        if (target_rows, target_digest) != (rows, digest) {
            return Err(CopyError::Mismatch {
                table: table.name.clone(),
                source_rows: rows,
                source_digest: digest,
                target_rows,
                target_digest,
            });
        }
        copied.push(TableCopy { table: table.name.clone(), rows, digest });
    }
    Ok(copied)
}

/// The source's tables with their target column types, parents before the tables whose
/// foreign keys name them.
fn tables_in_order(
    source: &rusqlite::Connection,
    target: &Sql<'_>,
    names: &[String],
    renames: &BTreeMap<String, String>,
) -> Result<Vec<Table>, CopyError> {
    let mut parents: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut tables = BTreeMap::new();
    for name in names {
        let name = name.clone();
        let target_name = renames.get(&name).cloned().unwrap_or_else(|| name.clone());
        let target_columns: BTreeMap<String, (String, bool)> = target
            .query_map(
                "SELECT column_name, data_type, is_identity FROM information_schema.columns
                 WHERE table_schema = current_schema() AND table_name = CAST($1 AS TEXT)",
                super::params![target_name.clone()],
                |r| Ok((r.get::<String>(0)?, (r.get::<String>(1)?, r.get::<String>(2)? == "YES"))),
            )?
            .into_iter()
            .collect();
        if target_columns.is_empty() {
            return Err(CopyError::MissingTable { table: name });
        }
        let source_columns: Vec<String> = source
            .prepare("SELECT name FROM pragma_table_info(?1) ORDER BY cid")?
            .query_map([&name], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        let mut columns = Vec::with_capacity(source_columns.len());
        let mut identity = Vec::new();
        for column in source_columns {
            let Some((pg_type, is_identity)) = target_columns.get(&column) else {
                return Err(CopyError::MissingColumn { table: name, column });
            };
            let kind = Kind::of(pg_type).ok_or_else(|| CopyError::UnknownType {
                table: name.clone(),
                column: column.clone(),
                pg_type: pg_type.clone(),
            })?;
            if *is_identity {
                identity.push(column.clone());
            }
            columns.push((column, kind));
        }
        let referenced: BTreeSet<String> = source
            .prepare("SELECT \"table\" FROM pragma_foreign_key_list(?1)")?
            .query_map([&name], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        parents.insert(name.clone(), referenced);
        tables.insert(name.clone(), Table { name, target: target_name, columns, identity });
    }
    // Kahn's order over the foreign keys (a table naming itself is no constraint here:
    // its rows go in one statement per batch, and PostgreSQL checks at each statement).
    let mut ordered = Vec::with_capacity(tables.len());
    while !tables.is_empty() {
        let ready: Vec<String> = tables
            .keys()
            .filter(|t| parents[*t].iter().all(|p| *p == **t || !tables.contains_key(p)))
            .cloned()
            .collect();
        if ready.is_empty() {
            return Err(CopyError::Cycle(tables.keys().cloned().collect::<Vec<_>>().join(", ")));
        }
        for name in ready {
            ordered.extend(tables.remove(&name));
        }
    }
    Ok(ordered)
}

/// Inserts the table's rows in batches; returns their count and digest.
fn copy_table(
    source: &rusqlite::Transaction<'_>,
    target: &Sql<'_>,
    table: &Table,
) -> Result<(u64, TableDigest), CopyError> {
    let width = table.columns.len();
    let per_insert = (PARAMS_PER_INSERT / width).max(1);
    let mut statement =
        source.prepare(&format!("SELECT {} FROM {}", table.column_list(), quoted(&table.name)))?;
    let mut rows = statement.query([])?;
    let (mut count, mut digest) = (0u64, TableDigest::default());
    let mut batch: Vec<Cell> = Vec::with_capacity(per_insert * width);
    let mut encoded = Vec::new();
    while let Some(row) = rows.next()? {
        count += 1;
        encoded.clear();
        for (idx, (column, kind)) in table.columns.iter().enumerate() {
            let cell = Cell::from_sqlite(row.get_ref(idx)?, *kind).map_err(|problem| {
                CopyError::Value {
                    table: table.name.clone(),
                    column: column.clone(),
                    row: count,
                    problem,
                }
            })?;
            cell.encode(&mut encoded);
            batch.push(cell);
        }
        digest.add(&encoded);
        if batch.len() == per_insert * width {
            insert(target, table, &batch)?;
            batch.clear();
        }
    }
    if !batch.is_empty() {
        insert(target, table, &batch)?;
    }
    Ok((count, digest))
}

/// One multi-row `INSERT` of `cells` (whole rows, in the table's column order).
fn insert(target: &Sql<'_>, table: &Table, cells: &[Cell]) -> Result<(), SqlError> {
    let width = table.columns.len();
    let rows: Vec<String> = (0..cells.len() / width)
        .map(|r| {
            let placeholders: Vec<String> =
                (1..=width).map(|c| format!("${}", r * width + c)).collect();
            format!("({})", placeholders.join(", "))
        })
        .collect();
    let sql = format!(
        "INSERT INTO {} ({}) VALUES {}",
        quoted(&table.target),
        table.column_list(),
        rows.join(", ")
    );
    let params: Vec<&dyn Param> = cells.iter().map(Cell::param).collect();
    target.execute(&sql, &params)?;
    Ok(())
}

/// The table's rows as PostgreSQL now holds them (within the copy's transaction): their
/// count and digest, read through a cursor so that a large table is not held in memory.
fn read_back(target: &Sql<'_>, table: &Table) -> Result<(u64, TableDigest), SqlError> {
    // A cursor named after the table (a hash: names are long): a FETCH is a prepared
    // statement, kept per statement text, whose row description is its cursor's.
    let hash = ring::digest::digest(&ring::digest::SHA256, table.target.as_bytes());
    let cursor = format!("falaj_copy_{}", hex::encode(&hash.as_ref()[..8]));
    target.execute_batch(&format!(
        "DECLARE {cursor} NO SCROLL CURSOR FOR SELECT {} FROM {}",
        table.column_list(),
        quoted(&table.target)
    ))?;
    let (mut count, mut digest) = (0u64, TableDigest::default());
    let mut encoded = Vec::new();
    loop {
        let fetched =
            target.query_map(&format!("FETCH {ROWS_PER_FETCH} FROM {cursor}"), &[], |row| {
                encoded.clear();
                for (idx, (_, kind)) in table.columns.iter().enumerate() {
                    Cell::from_row(row, idx, *kind)?.encode(&mut encoded);
                }
                digest.add(&encoded);
                Ok(())
            })?;
        count += fetched.len() as u64;
        if fetched.len() < ROWS_PER_FETCH {
            break;
        }
    }
    target.execute_batch(&format!("CLOSE {cursor}"))?;
    Ok((count, digest))
}

/// `name` as a quoted identifier (`user` and `window` are reserved words in PostgreSQL).
fn quoted(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest_of(rows: &[Vec<Cell>]) -> TableDigest {
        let mut digest = TableDigest::default();
        for row in rows {
            let mut encoded = Vec::new();
            for c in row {
                c.encode(&mut encoded);
            }
            digest.add(&encoded);
        }
        digest
    }

    #[test]
    fn a_digest_ignores_row_order_but_not_values_or_types() {
        let row =
            |id: i64, name: &str| vec![Cell::Integer(Some(id)), Cell::Text(Some(name.into()))];
        let forward = digest_of(&[row(1, "a"), row(2, "b")]);
        assert_eq!(forward, digest_of(&[row(2, "b"), row(1, "a")]));
        assert_ne!(forward, digest_of(&[row(1, "a"), row(2, "c")]));
        assert_ne!(forward, digest_of(&[row(1, "a")]));
        // A row twice is not the row once.
        assert_ne!(digest_of(&[row(1, "a")]), digest_of(&[row(1, "a"), row(1, "a")]));
        // The same bytes as text and as a blob, or NULL and an empty string, differ.
        let text = digest_of(&[vec![Cell::Text(Some("x".into()))]]);
        assert_ne!(text, digest_of(&[vec![Cell::Bytes(Some(b"x".to_vec()))]]));
        assert_ne!(
            digest_of(&[vec![Cell::Text(None)]]),
            digest_of(&[vec![Cell::Text(Some(String::new()))]])
        );
    }

    #[test]
    fn sqlite_values_convert_to_their_columns_or_are_refused() {
        let real = Cell::from_sqlite(ValueRef::Integer(3), Kind::Real).unwrap();
        assert!(matches!(real, Cell::Real(Some(v)) if v.to_bits() == 3f64.to_bits()));
        let text = Cell::from_sqlite(ValueRef::Blob(b"abc"), Kind::Text).unwrap();
        assert!(matches!(text, Cell::Text(Some(ref v)) if v == "abc"));
        let bytes = Cell::from_sqlite(ValueRef::Text(b"abc"), Kind::Bytes).unwrap();
        assert!(matches!(bytes, Cell::Bytes(Some(ref v)) if v == b"abc"));
        let error = Cell::from_sqlite(ValueRef::Real(1.5), Kind::Integer).unwrap_err();
        assert!(error.contains("Real") && error.contains("Integer"), "{error}");
        let error = Cell::from_sqlite(ValueRef::Blob(&[0xff, 0xfe]), Kind::Text).unwrap_err();
        assert!(error.contains("UTF-8"), "{error}");
        assert!(matches!(Cell::from_sqlite(ValueRef::Null, Kind::Bytes), Ok(Cell::Bytes(None))));
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quoted("user"), "\"user\"");
        assert_eq!(quoted("a\"b"), "\"a\"\"b\"");
    }
}
