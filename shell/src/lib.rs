//! What the agent's and the control plane's shells share and that does I/O, so the core
//! (`falaj-common`) stays free of it and neither daemon depends on the other.
//!
//! - [`config`]: finding and reading a configuration file; absolute command-line paths.
//! - [`daemon`]: systemd's notify protocol and the signals that stop a daemon.
//! - [`exit`]: one [`exit::Failure`] type and the sysexits codes both command lines use.
//! - [`fs`]: durable file writes (temporary file, fsync, rename, fsync of the directory).
//! - [`http`]: serving an axum router to slow or hostile clients: a deadline on each
//!   request head, a cap on open connections, a bounded graceful stop; plain or TLS.
//! - [`sqlite`]: opening a database: owner-only file, pragmas, versioned migrations.
//! - [`tls`]: a listener's certificate, key and optional client CA from PEM files,
//!   reloadable while it serves.

#![warn(unreachable_pub)]

pub mod config;
pub mod daemon;
pub mod exit;
pub mod fs;
pub mod http;
pub mod sqlite;
pub mod tls;
