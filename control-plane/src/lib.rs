//! The Falaj control plane: signing keys and trust root ([`keys`]; those in force on the
//! daemon, taken again after a rotation: [`keyring`]), signed bundles with
//! their reference data profiles ([`bundle`], [`reference`](mod@reference)), the sample
//! model ([`sample`]), and the daemon ([`daemon`]): agent sessions over QUIC ([`quic`]),
//! the admin API ([`admin`]) over the services it shares with the console ([`service`]),
//! state in SQLite ([`db`]), metric windows and drift ([`monitoring`]), alerts
//! ([`alerts`], sent by [`webhook`]) and the Prometheus endpoint ([`exporter`]).
//! Beside them, the feature store ([`features`]), fine-tune jobs ordered for agents
//! ([`finetune`]), rollouts of new versions, judged here and on agents ([`rollouts`]), and
//! the audit log of every change ([`audit`]), and users, roles, sessions and API tokens
//! with the permission each admin route requires ([`auth`]).
//!
//! The binary (`falaj-control`) is a thin shell over [`cli`].

pub mod admin;
pub mod alerts;
pub mod audit;
pub mod auth;
pub mod blobs;
pub mod bundle;
pub mod ca;
pub mod cli;
pub mod client;
pub mod config;
pub mod console;
pub mod daemon;
pub mod db;
pub mod event_poll;
pub mod exporter;
pub mod features;
pub mod files;
pub mod finetune;
pub mod keyring;
pub mod keys;
pub mod lease;
pub mod monitoring;
pub mod outbox;
pub mod push;
pub mod quic;
pub mod reference;
pub mod rollouts;
pub mod sample;
pub mod secrets;
pub mod service;
pub mod sql;
pub mod state;
pub mod vault;
pub mod webhook;
pub mod window_queue;

/// A point where the crash tests kill the process: built with the `failpoints` feature
/// (the tests' builds only), `FAILPOINTS=NAME=return` aborts the process there, as a
/// power cut or SIGKILL would stop it. Nothing at all otherwise. The variable is read at
/// the first point reached, so no command needs to set the points up.
#[inline]
pub(crate) fn crash_point(name: &str) {
    #[cfg(feature = "failpoints")]
    {
        static SETUP: std::sync::Once = std::sync::Once::new();
        // The scenario lives as long as the process: its guard is never dropped.
        SETUP.call_once(|| std::mem::forget(fail::FailScenario::setup()));
        fail::eval(name, |_| std::process::abort());
    }
    #[cfg(not(feature = "failpoints"))]
    let _ = name;
}
