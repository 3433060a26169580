//! Ingest's rows written to PostgreSQL many at once: gathered into one array per column
//! and written by one `INSERT ... SELECT FROM unnest(...) ON CONFLICT` per [`ROWS`] rows,
//! instead of one statement (and one round trip) per row. A statement with `ON CONFLICT
//! DO UPDATE` may not touch one row twice, so a key and time seen again within a batch
//! replaces the values gathered for it: the last one wins, as it does on SQLite, where
//! each row is its own upsert.
//!
//! SQLite keeps its one prepared statement per row ([`super::ingest`]): there a statement
//! is a function call, not a round trip.

use std::collections::HashMap;
use std::error::Error;
use std::fmt::Write as _;

use bytes::BytesMut;
use falaj_common::features::view::KeyType;
use falaj_common::features::{Key, Value};
use postgres::types::{IsNull, ToSql, Type, to_sql_checked};

use super::store::{self, Bound, StoredView};
use crate::sql::{Param, Sql, SqlError};

/// Rows written by one statement: large enough that the round trip and the statement's
/// start are a small share of its time, small enough that the arrays stay a few MiB.
pub const ROWS: usize = 4096;

/// One column's values for a batch, as the array PostgreSQL unnests.
#[derive(Debug, Clone)]
enum Column {
    /// `BIGINT[]`.
    Int(Vec<Option<i64>>),
    /// `DOUBLE PRECISION[]`.
    Real(Vec<Option<f64>>),
    /// `TEXT[]`.
    Text(Vec<Option<String>>),
}

impl Column {
    /// An empty column of the type `like` binds as.
    fn like(like: &Bound) -> Self {
        match like {
            Bound::Int(_) => Self::Int(Vec::new()),
            Bound::Real(_) => Self::Real(Vec::new()),
            Bound::Text(_) => Self::Text(Vec::new()),
        }
    }

    /// The array's type, for the statement's cast.
    fn sql_type(&self) -> &'static str {
        match self {
            Self::Int(_) => "BIGINT[]",
            Self::Real(_) => "DOUBLE PRECISION[]",
            Self::Text(_) => "TEXT[]",
        }
    }

    fn clear(&mut self) {
        match self {
            Self::Int(v) => v.clear(),
            Self::Real(v) => v.clear(),
            Self::Text(v) => v.clear(),
        }
    }

    /// Puts `value` at `index` (appended when `index` is the length). A value of another
    /// type than the column's is refused, as PostgreSQL refuses it bound alone.
    fn put(&mut self, index: usize, value: Bound, name: &str) -> Result<(), SqlError> {
        fn at<T>(v: &mut Vec<T>, index: usize, value: T) {
            match v.get_mut(index) {
                Some(slot) => *slot = value,
                None => v.push(value),
            }
        }
        match (self, value) {
            (Self::Int(v), Bound::Int(x)) => at(v, index, x),
            (Self::Real(v), Bound::Real(x)) => at(v, index, x),
            (Self::Text(v), Bound::Text(x)) => at(v, index, x),
            (column, value) => {
                return Err(SqlError::Encode {
                    what: "a feature row",
                    message: format!(
                        "column {name:?} holds {}, not {value:?}",
                        column.sql_type().trim_end_matches("[]")
                    ),
                });
            }
        }
        Ok(())
    }
}

impl ToSql for Column {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        match self {
            Self::Int(v) => v.to_sql_checked(ty, out),
            Self::Real(v) => v.to_sql_checked(ty, out),
            Self::Text(v) => v.to_sql_checked(ty, out),
        }
    }

    fn accepts(ty: &Type) -> bool {
        <Vec<Option<i64>> as ToSql>::accepts(ty)
            || <Vec<Option<f64>> as ToSql>::accepts(ty)
            || <Vec<Option<String>> as ToSql>::accepts(ty)
    }

    to_sql_checked!();
}

/// Arrays are PostgreSQL's: SQLite is never given one (its rows go one by one).
impl rusqlite::ToSql for Column {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        Err(rusqlite::Error::ToSqlConversionFailure("an array binds on PostgreSQL only".into()))
    }
}

/// The rows of one ingest not yet written, by column.
pub struct Batch {
    /// The statement: `$1` the keys, `$2` the times, `$3` the ingest id, then a feature
    /// column each.
    insert: String,
    ingest: i64,
    names: Vec<String>,
    entity: Column,
    times: Column,
    features: Vec<Column>,
    /// Where each (key, time) of this batch is.
    slots: HashMap<(Key, i64), usize>,
    len: usize,
}

impl Batch {
    /// An empty batch for rows of `stored` written by ingest `ingest` into its table on
    /// PostgreSQL.
    pub fn new(stored: &StoredView, ingest: i64) -> Self {
        let view = &stored.view;
        let entity = match view.entity.kind {
            KeyType::I64 => Column::Int(Vec::with_capacity(ROWS)),
            KeyType::String => Column::Text(Vec::with_capacity(ROWS)),
        };
        let features: Vec<Column> = view
            .features
            .iter()
            .map(|f| Column::like(&store::sql_value(&Value::Null, &f.kind)))
            .collect();
        let arrays = std::iter::once(format!("$1::{}", entity.sql_type()))
            .chain(std::iter::once("$2::BIGINT[]".to_owned()))
            .chain(
                features.iter().enumerate().map(|(i, c)| format!("${}::{}", i + 4, c.sql_type())),
            )
            .collect::<Vec<_>>()
            .join(", ");
        let aliases = (0..features.len()).fold(String::new(), |mut out, i| {
            let _ = write!(out, ", c{i}");
            out
        });
        let updates = std::iter::once("ingest".to_owned())
            .chain(view.features.iter().map(|f| format!("\"{}\"", f.name)))
            .map(|c| format!("{c} = excluded.{c}"))
            .collect::<Vec<_>>()
            .join(", ");
        let insert = format!(
            "INSERT INTO {table} (entity, event_time, ingest, {columns})
             SELECT k, t, CAST($3 AS BIGINT){aliases} FROM unnest({arrays}) AS r(k, t{aliases})
             ON CONFLICT (entity, event_time) DO UPDATE SET {updates}",
            table = stored.table(crate::sql::Backend::Postgres),
            columns = store::feature_columns(view),
        );
        Self {
            insert,
            ingest,
            names: view.features.iter().map(|f| f.name.clone()).collect(),
            entity,
            times: Column::Int(Vec::with_capacity(ROWS)),
            features,
            slots: HashMap::with_capacity(ROWS),
            len: 0,
        }
    }

    /// Adds a row (its key, time and values as the view orders its features), replacing
    /// the one of the same key and time in this batch; writes the batch once it is full.
    pub fn push(
        &mut self,
        sql: &Sql<'_>,
        key: &Key,
        time: i64,
        values: impl Iterator<Item = Bound>,
    ) -> Result<(), SqlError> {
        let index = *self.slots.entry((key.clone(), time)).or_insert(self.len);
        if index == self.len {
            self.entity.put(index, store::sql_key(key), "entity")?;
            self.times.put(index, Bound::Int(Some(time)), "event_time")?;
            self.len += 1;
        }
        for ((column, name), value) in self.features.iter_mut().zip(&self.names).zip(values) {
            column.put(index, value, name)?;
        }
        if self.len == ROWS { self.flush(sql) } else { Ok(()) }
    }

    /// Writes the rows gathered, if any.
    pub fn flush(&mut self, sql: &Sql<'_>) -> Result<(), SqlError> {
        if self.len == 0 {
            return Ok(());
        }
        let mut params: Vec<&dyn Param> = vec![&self.entity, &self.times, &self.ingest];
        params.extend(self.features.iter().map(|c| c as &dyn Param));
        sql.execute(&self.insert, &params)?;
        self.times.clear();
        self.entity.clear();
        self.features.iter_mut().for_each(Column::clear);
        self.slots.clear();
        self.len = 0;
        Ok(())
    }
}
