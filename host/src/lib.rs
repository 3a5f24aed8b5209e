//! spendguard: let AI agents spend money safely.
//!
//! The host holds the wallet; agents propose spends; the operator's policies,
//! WebAssembly modules run in [`sandbox`], decide.

pub mod audit;
pub mod cards;
pub mod cases;
pub mod config;
pub mod datadir;
pub mod decide;
pub mod history;
pub mod ledger;
pub mod lookalike;
pub mod mandates;
pub mod mcp;
pub mod money;
pub mod policy;
pub mod sandbox;
pub mod server;
pub mod storage;
