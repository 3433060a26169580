//! Durable file writes, as both daemons make them ([`falaj_shell::fs`]).

pub use falaj_shell::fs::{create_private_dir, sync_dir, write_atomic};
