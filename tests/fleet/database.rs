//! The PostgreSQL pass's databases, for the in-process fleet (`tests/fleet`) and the
//! control plane as a process (`tests/support`'s `ControlProcess`): a module at the root
//! of each crate that includes either (`tests/it`, `tests/external`, `benches/soak.rs`),
//! loaded once there.

use std::path::Path;

/// The PostgreSQL pass of this suite: with `FALAJ_TEST_POSTGRES` set to a running
/// cluster's superuser URL without a database (`postgres://postgres@127.0.0.1:5432`), the
/// control plane of each data directory keeps its state in a database of its own there,
/// named after the directory, so one restarted on it finds its state; without it, SQLite
/// in the directory.
pub fn postgres_for(dir: &Path) -> Option<String> {
    let server = std::env::var("FALAJ_TEST_POSTGRES").ok()?;
    let hash = falaj_common::keys::Sha256::of(dir.as_os_str().as_encoded_bytes()).to_string();
    let name = format!("falaj_{}", &hash[..16]);
    let admin = format!("{server}/postgres?sslmode=disable");
    let made = name.clone();
    // The synchronous client blocks on a runtime of its own: on a thread of its own.
    std::thread::spawn(move || {
        let mut client = postgres::Client::connect(&admin, postgres::NoTls)
            .expect("FALAJ_TEST_POSTGRES names a cluster that accepts its superuser");
        let exists = client
            .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&made])
            .expect("pg_database is read");
        if exists.is_none() {
            client.batch_execute(&format!("CREATE DATABASE {made}")).expect("a database is made");
        }
    })
    .join()
    .expect("the database is made");
    Some(format!("{server}/{name}?sslmode=disable"))
}
