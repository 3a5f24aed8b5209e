//! End-to-end tests: real policies built from source, the real sandbox, the
//! real `spendguard` binary. One test binary for the whole product, a module
//! per topic (wasmtime's `tests/all` layout).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a failure should stop the test

mod approvals;
mod artifacts;
mod audit;
mod authority;
mod bad_input;
mod cards;
mod cli;
mod cluster;
mod contract;
mod crash;
mod flow;
mod hardening;
mod hostile;
mod mandates;
mod operations;
mod policies;
mod races;
mod registry;
mod revocation;
mod sandbox;
mod spends;
mod storage;
mod support;
mod tokens;
mod transport;
