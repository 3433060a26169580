//! `migrate`: bring a control plane's databases to this version's schema (`--data-dir`
//! for SQLite, `--database` for PostgreSQL), or copy a stopped SQLite control plane into
//! an empty PostgreSQL database (`--from-sqlite DIR --to URL`), checked table by table.

use std::path::Path;

use super::render::render_copied;
use super::{Failure, MigrateArgs};
use crate::db::{self, Db};
use crate::features::store;
use crate::sql::PgOptions;
use crate::sql::copy::{CopyError, Prepare, copy_databases};
use crate::sql::postgres::redacted;

pub(super) fn migrate(args: MigrateArgs) -> Result<(), Failure> {
    match (args.from_sqlite, args.to, args.data_dir, args.database) {
        (Some(from), Some(to), None, None) => copy(&from, &to),
        (None, None, Some(dir), None) => {
            let path = dir.join(db::DB_FILE);
            Db::open(&path).map_err(Failure::config)?;
            Db::open_with(&dir.join(store::FEATURES_DB_FILE), store::MIGRATIONS)
                .map_err(Failure::config)?;
            println!(
                "{}: the control plane's databases are at this version's schema",
                dir.display()
            );
            Ok(())
        }
        (None, None, None, Some(url)) => {
            let db = Db::open_postgres(&PgOptions::new(url.clone())).map_err(Failure::config)?;
            store::migrate_postgres(&db).map_err(Failure::config)?;
            println!("{}: the control plane's schemas are at this version's", redacted(&url));
            Ok(())
        }
        _ => Err(Failure::usage(anyhow::anyhow!(
            "give one of --data-dir DIR, --database URL, or --from-sqlite DIR with --to URL"
        ))),
    }
}

/// Copies `from`'s `control.db` and, when there is one, its `features.db` into the
/// PostgreSQL database at `url`, in one transaction.
fn copy(from: &Path, url: &str) -> Result<(), Failure> {
    let path = from.join(db::DB_FILE);
    if !path.is_file() {
        return Err(Failure::config(anyhow::anyhow!(
            "{}: no such file: is {} a control plane's data directory?",
            path.display(),
            from.display()
        )));
    }
    let control = Db::open(&path).map_err(Failure::config)?;
    let features_path = from.join(store::FEATURES_DB_FILE);
    let features = if features_path.is_file() {
        Some(Db::open_with(&features_path, store::MIGRATIONS).map_err(Failure::config)?)
    } else {
        None
    };
    let target = Db::open_postgres(&PgOptions::new(url)).map_err(Failure::config)?;
    store::migrate_postgres(&target).map_err(Failure::config)?;
    let mut sources: Vec<(&Db, Option<Prepare>)> = vec![(&control, None)];
    if let Some(features) = &features {
        sources.push((features, Some(store::make_view_tables)));
    }
    let copied = copy_databases(&sources, &target).map_err(|e| match e {
        CopyError::Database(e) => Failure::other(e),
        refused => Failure::refused(anyhow::anyhow!(
            "copying {} into {}: {refused}",
            from.display(),
            redacted(url)
        )),
    })?;
    print!("{}", render_copied(&copied, &from.display().to_string(), &redacted(url)));
    Ok(())
}
