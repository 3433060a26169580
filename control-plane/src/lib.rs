//! The Falaj control plane. This first part works offline: it creates the signing keys
//! and trust root ([`keys`]), builds and inspects signed bundles ([`bundle`]) with their
//! reference data profiles ([`reference`](mod@reference)), and makes the sample model ([`sample`]).
//!
//! The binary (`falaj-control`) is a thin shell over [`cli`].

pub mod admin;
pub mod blobs;
pub mod bundle;
pub mod ca;
pub mod cli;
pub mod client;
pub mod config;
pub mod daemon;
pub mod db;
pub mod files;
pub mod keys;
pub mod push;
pub mod quic;
pub mod reference;
pub mod sample;
pub mod secrets;
pub mod state;
pub mod systemd;
