//! End-to-end tests: real policies built from source, the real sandbox, the
//! real `spendguard` binary. One test binary for the whole product, a module
//! per topic (wasmtime's `tests/all` layout).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a failure should stop the test

mod artifacts;
mod audit;
mod backends;
mod cli;
mod cluster;
mod contract;
mod crash;
mod daemon;
mod guests;
mod hardening;
mod hostile;
mod policies;
mod races;
mod registry;
mod revocation;
mod sandbox;
mod storage;
mod tokens;
mod transport;
