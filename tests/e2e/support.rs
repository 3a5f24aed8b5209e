//! The harness every suite shares: the `spendguard` binary as a process, a
//! wallet with its daemon on 127.0.0.1 spoken to over real HTTP, the example
//! policies and hostile guests built from source, both storage backends,
//! raw malformed requests, a view of the database, seeded randomness and
//! load helpers.

pub(crate) mod backends;
pub(crate) mod daemon;
pub(crate) mod database;
pub(crate) mod guests;
pub(crate) mod load;
pub(crate) mod random;
pub(crate) mod raw;
pub(crate) mod wallet;

pub(crate) use backends::{Backend, Kind, TestDatabase, on_each_backend, simulated_cards};
pub(crate) use daemon::{
    Daemon, LISTENING, NO_RATE_LIMIT, STARTUP_TIMEOUT, path, rss_bytes, spendguard, stderr, stdout,
};
pub(crate) use database::{db_diff, db_dump};
pub(crate) use load::{check_daemon_race, from_cents, race, race_daemon, to_cents};
pub(crate) use random::{XorShift, seed};
pub(crate) use raw::{Bad, bad, send_raw};
pub(crate) use wallet::{
    AgentToken, Body, Reply, Wallet, approved, assert_no_secrets, assert_secrets, bearer, declined, ids,
    loads, proposal,
};
