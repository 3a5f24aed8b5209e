//! Log lines recorded with the decision in the audit trail.
//!
//! The host bounds them (by default 64 lines of at most 4 KiB each per
//! evaluation); a policy that logs more is stopped and its spend denied, so
//! log what explains a decision, not a trace.

/// How important a log line is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Detail useful when debugging the policy.
    Debug,
    /// What the policy saw and why it decided.
    Info,
    /// Something the operator should look at.
    Warn,
}

/// A panic's message is cut to this many bytes before it is logged, so a
/// panicking policy is reported as a panic and not as oversize output.
#[cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]
pub(crate) const PANIC_MESSAGE_MAX: usize = 512;

/// Record a line at `level`.
pub fn log(level: Level, message: &str) {
    #[cfg(target_arch = "wasm32")]
    {
        use crate::bindings::spendguard::policy::log as wit;
        let level = match level {
            Level::Debug => wit::Level::Debug,
            Level::Info => wit::Level::Info,
            Level::Warn => wit::Level::Warn,
        };
        wit::log(level, message);
    }
    #[cfg(not(target_arch = "wasm32"))]
    crate::testing::record_log(level, message);
}

/// Record a debug line.
pub fn debug(message: &str) {
    log(Level::Debug, message);
}

/// Record an info line.
pub fn info(message: &str) {
    log(Level::Info, message);
}

/// Record a warning.
pub fn warn(message: &str) {
    log(Level::Warn, message);
}
