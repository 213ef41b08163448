//! Helpers shared by the bridge's integration tests: a private Mosquitto
//! per test, a TCP proxy that can blackhole a link, and a test PKI.

#![allow(dead_code, clippy::unwrap_used)]

pub mod fake;
pub mod mosquitto;
pub mod pki;
pub mod proxy;
