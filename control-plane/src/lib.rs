//! The Falaj control plane. This first part works offline: it creates the signing keys
//! and trust root ([`keys`]), builds and inspects signed bundles ([`bundle`]) with their
//! reference data profiles ([`reference`](mod@reference)), and makes the sample model ([`sample`]).
//!
//! The binary (`falaj-control`) is a thin shell over [`cli`].

pub mod bundle;
pub mod cli;
pub mod files;
pub mod keys;
pub mod reference;
pub mod sample;
