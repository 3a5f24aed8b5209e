//! The bounds of one policy evaluation. Every limit has a default chosen for
//! a policy that reads its config, asks history a few questions and decides;
//! each is configurable for policies that legitimately need more.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Largest module accepted: an example policy with serde_json and
/// rust_decimal is a few hundred KiB; 8 MiB leaves room without letting a
/// module be a denial of service on compile.
pub const DEFAULT_MAX_MODULE_BYTES: usize = 8 * 1024 * 1024;
/// Instructions (fuel) per evaluation. The example policies use well under a
/// million; 20 million ran out in about 3 ms in a tight loop here (`policy eval` of the hostile guest), so a
/// runaway loop stops quickly and deterministically.
pub const DEFAULT_FUEL: u64 = 20_000_000;
/// Wall-clock bound per evaluation, the backstop for what fuel does not count
/// (slow host calls, pathological compiled code).
pub const DEFAULT_DEADLINE: Duration = Duration::from_millis(100);
/// Linear memory per instance. Parsing a config and a request needs far less.
pub const DEFAULT_MAX_MEMORY_BYTES: usize = 16 * 1024 * 1024;
/// Native stack the policy's Wasm may use, which bounds recursion depth.
pub const DEFAULT_MAX_STACK_BYTES: usize = 512 * 1024;
/// Largest string a policy may hand back: a reason, a config error, one log
/// line, a history filter's merchant id. Reasons are read by people.
pub const DEFAULT_MAX_OUTPUT_BYTES: usize = 4 * 1024;
/// Log lines per evaluation.
pub const DEFAULT_MAX_LOG_LINES: usize = 64;
/// History queries per evaluation: each is a database query in the daemon.
pub const DEFAULT_MAX_HISTORY_CALLS: u32 = 32;
/// Largest config document an operator may attach.
pub const DEFAULT_MAX_CONFIG_BYTES: usize = 64 * 1024;
/// Evaluations that may run at once in one sandbox (slots of the pooling
/// allocator); one more waits for a slot rather than failing.
pub const DEFAULT_MAX_CONCURRENT: u32 = 64;

/// The bounds of the sandbox. `Limits::default()` gives the documented
/// defaults; every field can be set from a config file (`[sandbox]`) or the
/// CLI.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    pub max_module_bytes: usize,
    pub fuel: u64,
    #[serde(with = "millis")]
    pub deadline: Duration,
    pub max_memory_bytes: usize,
    pub max_stack_bytes: usize,
    pub max_output_bytes: usize,
    pub max_log_lines: usize,
    pub max_history_calls: u32,
    pub max_config_bytes: usize,
    pub max_concurrent: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_module_bytes: DEFAULT_MAX_MODULE_BYTES,
            fuel: DEFAULT_FUEL,
            deadline: DEFAULT_DEADLINE,
            max_memory_bytes: DEFAULT_MAX_MEMORY_BYTES,
            max_stack_bytes: DEFAULT_MAX_STACK_BYTES,
            max_output_bytes: DEFAULT_MAX_OUTPUT_BYTES,
            max_log_lines: DEFAULT_MAX_LOG_LINES,
            max_history_calls: DEFAULT_MAX_HISTORY_CALLS,
            max_config_bytes: DEFAULT_MAX_CONFIG_BYTES,
            max_concurrent: DEFAULT_MAX_CONCURRENT,
        }
    }
}

/// Durations in config files are whole milliseconds (`deadline = 100`).
mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}
