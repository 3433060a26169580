//! `migrate`: bring a control plane's databases to this version's schema (`--data-dir`
//! for SQLite, `--database` for PostgreSQL), or copy a stopped SQLite control plane into
//! an empty PostgreSQL database (`--from-sqlite DIR --to URL`), checked table by table.

use std::path::Path;

use super::render::render_copied;
use super::{Failure, MigrateArgs};
use crate::db::{self, Db};
use crate::sql::PgOptions;
use crate::sql::copy::{CopyError, copy_database};
use crate::sql::postgres::redacted;

pub(super) fn migrate(args: MigrateArgs) -> Result<(), Failure> {
    match (args.from_sqlite, args.to, args.data_dir, args.database) {
        (Some(from), Some(to), None, None) => copy(&from, &to),
        (None, None, Some(dir), None) => {
            let path = dir.join(db::DB_FILE);
            Db::open(&path).map_err(Failure::config)?;
            let features = dir.join(crate::features::store::FEATURES_DB_FILE);
            falaj_shell::sqlite::open(&features, crate::features::store::MIGRATIONS)
                .map_err(|e| Failure::config(anyhow::anyhow!("{}: {e}", features.display())))?;
            println!(
                "{}: the control plane's databases are at this version's schema",
                dir.display()
            );
            Ok(())
        }
        (None, None, None, Some(url)) => {
            Db::open_postgres(&PgOptions::new(url.clone())).map_err(Failure::config)?;
            println!("{}: the control plane's schema is at this version's", redacted(&url));
            Ok(())
        }
        _ => Err(Failure::usage(anyhow::anyhow!(
            "give one of --data-dir DIR, --database URL, or --from-sqlite DIR with --to URL"
        ))),
    }
}

/// Copies `from`'s `control.db` into the PostgreSQL database at `url`.
fn copy(from: &Path, url: &str) -> Result<(), Failure> {
    let path = from.join(db::DB_FILE);
    if !path.is_file() {
        return Err(Failure::config(anyhow::anyhow!(
            "{}: no such file: is {} a control plane's data directory?",
            path.display(),
            from.display()
        )));
    }
    let source = Db::open(&path).map_err(Failure::config)?;
    let target = Db::open_postgres(&PgOptions::new(url)).map_err(Failure::config)?;
    let copied = copy_database(&source, &target).map_err(|e| match e {
        CopyError::Database(e) => Failure::other(e),
        refused => Failure::refused(anyhow::anyhow!(
            "copying {} into {}: {refused}",
            path.display(),
            redacted(url)
        )),
    })?;
    print!("{}", render_copied(&copied, &path.display().to_string(), &redacted(url)));
    Ok(())
}
