//! Benchmarks only: `benches/decision/` measures the latency of one spend
//! decision in the sandbox, against the same rules in Cedar and in plain
//! Rust. Run it with `make bench`; BENCHMARKS.md at the repository's root
//! has the method and the results.
