//! The policy sandbox: load a policy module once, then evaluate each spend in
//! a fresh, bounded instance. Every fault becomes a deny (fail closed).
//!
//! This is the only place that knows about wasmtime. One bindings module per
//! WIT version (`v0_1`) converts between the engine and [`crate::policy`].

mod cache;
mod layout;
mod limits;
mod v0_1;

pub use cache::ArtifactCache;
use cache::ArtifactKey;
pub use layout::{MemoryLayout, RECOMMENDED_STACK_BYTES, memory_layout};

use std::borrow::Cow;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde::Serialize;
use sha2::{Digest, Sha256};
use wasmtime::component::{Component, Linker};
use wasmtime::{
    Config, Enabled, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, ResourceLimiter, Store,
    Trap, WasmBacktraceDetails,
};

pub use limits::*;

use crate::history::{History, HistoryScope};
use crate::policy::{Decision, SpendRequest};

/// Linear memory each pooled slot keeps resident between evaluations.
const KEEP_RESIDENT_BYTES: usize = 2 * 1024 * 1024;

/// How often the engine's epoch advances; the deadline is counted in these.
pub const EPOCH_TICK: Duration = Duration::from_millis(1);

/// The only interfaces a policy may import: the `spend-policy` world's.
const ALLOWED_IMPORTS: &[&str] =
    &["spendguard:policy/types@0.1.0", "spendguard:policy/history@0.1.0", "spendguard:policy/log@0.1.0"];
/// Core-module import namespaces that wit-bindgen emits for those interfaces.
const ALLOWED_CORE_IMPORT_PREFIX: &str = "spendguard:policy/";
const REQUIRED_EXPORTS: &[&str] = &["validate-config", "evaluate"];

/// Why a module was refused at load.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoadError {
    #[error("module is {size} bytes, over the limit of {max}")]
    TooLarge { size: usize, max: usize },
    #[error("not a WebAssembly module or component")]
    NotWasm,
    #[error("invalid WebAssembly: {0}")]
    Invalid(String),
    #[error(
        "imports `{0}`, which is outside the spendguard:policy world (policies may import only its history and log interfaces)"
    )]
    ForeignImport(String),
    #[error(
        "core module has no component type: build it with spendguard-sdk (wit-bindgen) for wasm32-unknown-unknown"
    )]
    NoComponentType,
    #[error("cannot turn the module into a component: {0}")]
    Componentize(String),
    #[error(
        "missing export `{0}`: a policy exports `validate-config` and `evaluate` (use spendguard_sdk::export_policy!)"
    )]
    MissingExport(String),
    #[error("exports do not match spendguard:policy@0.1.0: {0}")]
    WrongExports(String),
    #[error("module needs {needs} bytes of memory at start, over the sandbox's limit of {max}")]
    MemoryTooLarge { needs: u64, max: usize },
    #[error("module does not fit the sandbox's limits: {0}")]
    OverLimits(String),
}

/// Why an evaluation failed. Each makes the spend deny.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", content = "detail", rename_all = "snake_case")]
pub enum Fault {
    OutOfFuel,
    DeadlineExceeded,
    MemoryLimit,
    StackOverflow,
    Panic(String),
    Trap(String),
    OversizeOutput(String),
    TooManyHistoryCalls,
    InvalidCardTerms(String),
    HostError(String),
}

impl Fault {
    /// A stable snake_case name for metrics and scripts.
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::OutOfFuel => "out_of_fuel",
            Fault::DeadlineExceeded => "deadline_exceeded",
            Fault::MemoryLimit => "memory_limit",
            Fault::StackOverflow => "stack_overflow",
            Fault::Panic(_) => "panic",
            Fault::Trap(_) => "trap",
            Fault::OversizeOutput(_) => "oversize_output",
            Fault::TooManyHistoryCalls => "too_many_history_calls",
            Fault::InvalidCardTerms(_) => "invalid_card_terms",
            Fault::HostError(_) => "host_error",
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::OutOfFuel => f.write_str("out of fuel"),
            Fault::DeadlineExceeded => f.write_str("deadline exceeded"),
            Fault::MemoryLimit => f.write_str("memory limit"),
            Fault::StackOverflow => f.write_str("stack overflow"),
            Fault::Panic(m) => write!(f, "panic: {m}"),
            Fault::Trap(m) => write!(f, "trap: {m}"),
            Fault::OversizeOutput(m) => write!(f, "oversize output: {m}"),
            Fault::TooManyHistoryCalls => f.write_str("too many history calls"),
            Fault::InvalidCardTerms(m) => write!(f, "invalid card terms: {m}"),
            Fault::HostError(m) => write!(f, "host error: {m}"),
        }
    }
}

/// The engine's compatibility fingerprint, stable across runs of one build:
/// wasmtime's own compatibility hash (its version, the target triple, the
/// compiler's and the ISA's flags, the tunables — fuel metering, epoch
/// interruption, stack and memory bounds — and the wasm features), and this
/// host's version and target, hashed with SHA-256.
fn engine_fingerprint(engine: &Engine) -> String {
    use std::hash::Hash;
    /// A `Hasher` that feeds SHA-256 (the standard library's hashers are not
    /// stable from one build to the next).
    struct Sha(Sha256);
    impl std::hash::Hasher for Sha {
        fn finish(&self) -> u64 {
            // Never used: the digest is read from the inner SHA-256.
            0
        }
        fn write(&mut self, bytes: &[u8]) {
            self.0.update(bytes);
        }
    }
    let mut h = Sha(Sha256::new());
    engine.precompile_compatibility_hash().hash(&mut h);
    for part in [env!("CARGO_PKG_VERSION"), std::env::consts::ARCH, std::env::consts::OS] {
        part.hash(&mut h);
    }
    hex::encode(h.0.finalize())
}

/// Every limit, as one string (they all shape what an artifact may be).
fn limits_fingerprint(limits: &Limits) -> String {
    serde_json::to_string(limits).unwrap_or_else(|_| format!("{limits:?}"))
}

/// The deny reason for a fault of policy `name`.
pub fn fault_reason(name: &str, fault: &Fault) -> String {
    format!("policy `{name}` failed: {fault}")
}

/// A log line's level, as the policy chose it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LogLevel {
    Debug,
    Info,
    Warn,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LogLine {
    pub level: LogLevel,
    pub message: String,
}

/// What one call into a policy produced, and what it cost.
#[derive(Debug, Clone)]
pub struct Run<T> {
    pub outcome: Result<T, Fault>,
    pub fuel_used: u64,
    pub elapsed: Duration,
    pub logs: Vec<LogLine>,
    pub history_calls: u32,
}

/// One evaluation: a decision, or the fault that stopped it.
pub type Evaluation = Run<Decision>;

impl Evaluation {
    /// The decision as it counts: a fault is a deny naming the policy.
    pub fn decision(&self, policy_name: &str) -> Decision {
        match &self.outcome {
            Ok(decision) => decision.clone(),
            Err(fault) => Decision::Deny(fault_reason(policy_name, fault)),
        }
    }
}

/// A policy module, checked and compiled, ready to instantiate.
pub struct LoadedPolicy {
    sha256: String,
    size: usize,
    imports: Vec<String>,
    exports: Vec<String>,
    bindings: Bindings,
    from_cache: bool,
}

impl fmt::Debug for LoadedPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadedPolicy")
            .field("sha256", &self.sha256)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

/// One variant per WIT version the host loads.
enum Bindings {
    V0_1(v0_1::SpendPolicyPre<GuestState>),
}

impl LoadedPolicy {
    /// Hex sha256 of the module as uploaded (before any componentizing).
    pub fn sha256(&self) -> &str {
        &self.sha256
    }
    pub fn size(&self) -> usize {
        self.size
    }
    /// The component's imports (interface names).
    pub fn imports(&self) -> &[String] {
        &self.imports
    }
    /// Whether it came compiled from the artifact cache.
    pub fn from_cache(&self) -> bool {
        self.from_cache
    }
    pub fn exports(&self) -> &[String] {
        &self.exports
    }
    /// The contract version, `spendguard:policy@0.1.0`.
    pub fn world(&self) -> &'static str {
        match self.bindings {
            Bindings::V0_1(_) => "spendguard:policy@0.1.0",
        }
    }
}

/// The engine and its bounds. Create one per process and share it: modules
/// are compiled once by [`Sandbox::load`], and each evaluation gets a fresh
/// instance from a pool.
pub struct Sandbox {
    engine: Engine,
    linker: Linker<GuestState>,
    limits: Limits,
    slots: Slots,
    ticker: Arc<AtomicBool>,
    /// Compiled policies on disk, when the sandbox has a place for them.
    cache: Option<ArtifactCache>,
    /// What an artifact must have been compiled with to be loaded here:
    /// the engine's settings and the limits.
    compiled_with: (String, String),
}

impl fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sandbox").field("limits", &self.limits).finish_non_exhaustive()
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.ticker.store(true, Ordering::Relaxed);
    }
}

impl Sandbox {
    pub fn new(limits: Limits) -> anyhow::Result<Self> {
        let mut pool = PoolingAllocationConfig::default();
        let slots = limits.max_concurrent.max(1);
        pool.total_component_instances(slots)
            // wit-component adds small shim modules beside the policy's own.
            .total_core_instances(slots * 4)
            .total_memories(slots)
            .total_tables(slots * 4)
            .max_memories_per_module(1)
            .max_memory_size(limits.max_memory_bytes)
            // A slot's memory is reset with memset up to this size, not
            // handed back to the kernel: no page faults on the next
            // instance, no TLB shootdowns across cores (a policy built with
            // the SDK uses about 1 MiB). Bounded: slots x this, at most.
            .linear_memory_keep_resident(KEEP_RESIDENT_BYTES.min(limits.max_memory_bytes))
            .table_keep_resident(64 * 1024)
            // What is decommitted goes in batches: fewer madvise calls.
            .decommit_batch_size(16)
            // Where the kernel has the PAGEMAP_SCAN ioctl (Linux 6.7 and
            // later), the reset above touches only the pages the instance
            // wrote, not the whole accessible region: a policy built with
            // the SDK has a 1 MiB arena in its initial memory and writes a
            // few pages of it. Elsewhere `Auto` leaves it off (memset).
            .pagemap_scan(Enabled::Auto);

        let mut config = Config::new();
        config
            .wasm_component_model(true)
            .consume_fuel(true)
            .epoch_interruption(true)
            .max_wasm_stack(limits.max_stack_bytes)
            // Evaluation is deterministic: the same request, config and
            // history give the same decision on every machine.
            .cranelift_nan_canonicalization(true)
            .relaxed_simd_deterministic(true)
            .wasm_backtrace_details(WasmBacktraceDetails::Disable)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config)?;

        let mut linker = Linker::new(&engine);
        v0_1::add_to_linker(&mut linker)?;

        let ticker = Arc::new(AtomicBool::new(false));
        let stop = Arc::clone(&ticker);
        let weak = engine.weak();
        thread::Builder::new().name("spendguard-epoch".into()).spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                thread::sleep(EPOCH_TICK);
                match weak.upgrade() {
                    Some(engine) => engine.increment_epoch(),
                    None => break,
                }
            }
        })?;

        let compiled_with = (engine_fingerprint(&engine), limits_fingerprint(&limits));
        Ok(Sandbox { engine, linker, slots: Slots::new(slots), limits, ticker, cache: None, compiled_with })
    }

    /// Keep compiled policies in `cache`, and load them from it: a restart
    /// then costs no compilation.
    pub fn with_cache(mut self, cache: ArtifactCache) -> Self {
        self.cache = Some(cache);
        self
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Check and compile a policy module (a core module built with the SDK,
    /// or a ready component). Refuses anything over the size cap, invalid,
    /// importing outside the policy world, or missing an export.
    pub fn load(&self, bytes: &[u8]) -> Result<LoadedPolicy, LoadError> {
        if bytes.len() > self.limits.max_module_bytes {
            return Err(LoadError::TooLarge { size: bytes.len(), max: self.limits.max_module_bytes });
        }
        let sha256 = hex::encode(Sha256::digest(bytes));
        let key = ArtifactKey {
            module_sha256: &sha256,
            engine: &self.compiled_with.0,
            limits: &self.compiled_with.1,
        };
        let (component, from_cache) = match self.cached(&key) {
            Some(component) => (component, true),
            None => (self.compile(bytes)?, false),
        };

        let ty = component.component_type();
        let imports: Vec<String> = ty.imports(&self.engine).map(|(name, _)| name.to_owned()).collect();
        if let Some(foreign) = imports.iter().find(|i| !ALLOWED_IMPORTS.contains(&i.as_str())) {
            return Err(LoadError::ForeignImport(foreign.clone()));
        }
        let exports: Vec<String> = ty.exports(&self.engine).map(|(name, _)| name.to_owned()).collect();
        if let Some(missing) = REQUIRED_EXPORTS.iter().find(|e| !exports.iter().any(|x| x == *e)) {
            return Err(LoadError::MissingExport((*missing).to_owned()));
        }
        let pre =
            self.linker.instantiate_pre(&component).map_err(|e| LoadError::WrongExports(format!("{e:#}")))?;
        let pre = v0_1::SpendPolicyPre::new(pre).map_err(|e| LoadError::WrongExports(format!("{e:#}")))?;
        // Stored only once every check has passed.
        if let (Some(cache), false) = (&self.cache, from_cache) {
            match component.serialize() {
                Ok(artifact) => cache.put(&key, &artifact),
                Err(e) => tracing::warn!(error = %e, "cannot serialize a compiled policy"),
            }
        }
        Ok(LoadedPolicy {
            sha256,
            size: bytes.len(),
            imports,
            exports,
            bindings: Bindings::V0_1(pre),
            from_cache,
        })
    }

    /// Compile a module (a core module is made a component first).
    fn compile(&self, bytes: &[u8]) -> Result<Component, LoadError> {
        let component_bytes: Cow<'_, [u8]> = if wasmparser::Parser::is_core_wasm(bytes) {
            Cow::Owned(componentize(bytes, self.limits.max_memory_bytes)?)
        } else if wasmparser::Parser::is_component(bytes) {
            Cow::Borrowed(bytes)
        } else {
            return Err(LoadError::NotWasm);
        };
        Component::new(&self.engine, &component_bytes).map_err(|e| {
            let message = format!("{e:#}");
            // The pooling allocator checks a component's memories and tables
            // against the sandbox's bounds when it is compiled.
            if message.contains("pooling allocator") {
                LoadError::OverLimits(message)
            } else {
                LoadError::Invalid(message)
            }
        })
    }

    /// The component compiled earlier from the same module, with the same
    /// engine settings and limits, if the cache holds it and vouches for it.
    #[allow(unsafe_code)]
    fn cached(&self, key: &ArtifactKey<'_>) -> Option<Component> {
        let artifact = self.cache.as_ref()?.get(key)?;
        // SAFETY: `Component::deserialize` trusts its bytes to be wasmtime's
        // own output. These are: the cache holds only what `load` serialized
        // after every check passed, in the owner-only data directory, and
        // `get` returned them only because their HMAC under the data
        // directory's secret verified for exactly this module's sha256, this
        // engine's fingerprint and these limits (so they are what this
        // engine compiled from these very module bytes). wasmtime itself
        // also refuses an artifact of another version or configuration.
        match unsafe { Component::deserialize(&self.engine, &artifact) } {
            Ok(component) => Some(component),
            Err(e) => {
                tracing::warn!(error = %e, "a cached policy does not load: compiling again");
                None
            }
        }
    }

    /// Run the policy's `validate-config` on `config` (a JSON document).
    /// `Ok(Err(message))` is the policy refusing the config.
    pub fn validate_config(&self, policy: &LoadedPolicy, config: &str) -> Run<Result<(), String>> {
        let scope = HistoryScope { agent_id: String::new(), currency: String::new() };
        self.run(Arc::new(NoHistory), scope, 0, |store| match &policy.bindings {
            Bindings::V0_1(pre) => v0_1::validate_config(pre, store, config),
        })
        .and_then(
            |result, limits| match result {
                Err(message) if message.len() > limits.max_output_bytes => {
                    Err(Fault::OversizeOutput(format!(
                        "config error of {} bytes, over the cap of {}",
                        message.len(),
                        limits.max_output_bytes
                    )))
                }
                other => Ok(other),
            },
            &self.limits,
        )
    }

    /// Evaluate one spend in a fresh instance. Never fails: a fault is
    /// reported in [`Run::outcome`] and counts as a deny.
    pub fn evaluate(
        &self,
        policy: &LoadedPolicy,
        request: &SpendRequest,
        config: &str,
        history: Arc<dyn History>,
    ) -> Evaluation {
        let scope = HistoryScope {
            agent_id: request.agent.id.clone(),
            currency: request.amount.currency().to_owned(),
        };
        self.run(history, scope, request.amount.exponent(), |store| match &policy.bindings {
            Bindings::V0_1(pre) => v0_1::evaluate(pre, store, request, config),
        })
        .and_then(|decision, limits| check_decision(decision, request, limits), &self.limits)
    }

    fn run<T>(
        &self,
        history: Arc<dyn History>,
        scope: HistoryScope,
        exponent: u8,
        call: impl FnOnce(&mut Store<GuestState>) -> wasmtime::Result<T>,
    ) -> Run<T> {
        let _slot = self.slots.acquire();
        let started = Instant::now();
        let state = GuestState {
            history,
            scope,
            exponent,
            limits: self.limits.clone(),
            history_calls: 0,
            logs: Vec::new(),
            fault: None,
            memory_refused: false,
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| s);
        let deadline_ticks = u64::try_from(self.limits.deadline.as_micros() / EPOCH_TICK.as_micros().max(1))
            .unwrap_or(u64::MAX)
            .max(1);
        store.set_epoch_deadline(deadline_ticks);
        let result = match store.set_fuel(self.limits.fuel) {
            Ok(()) => call(&mut store),
            Err(e) => Err(e),
        };
        let fuel_used = self.limits.fuel.saturating_sub(store.get_fuel().unwrap_or(0));
        let state = store.into_data();
        let outcome = result.map_err(|e| classify(e, &state));
        Run {
            outcome,
            fuel_used,
            elapsed: started.elapsed(),
            logs: state.logs,
            history_calls: state.history_calls,
        }
    }
}

impl<T> Run<T> {
    fn and_then<U>(self, f: impl FnOnce(T, &Limits) -> Result<U, Fault>, limits: &Limits) -> Run<U> {
        Run {
            outcome: self.outcome.and_then(|t| f(t, limits)),
            fuel_used: self.fuel_used,
            elapsed: self.elapsed,
            logs: self.logs,
            history_calls: self.history_calls,
        }
    }
}

/// A policy's own output, checked before the host trusts it.
fn check_decision(
    decision: v0_1::RawDecision,
    request: &SpendRequest,
    limits: &Limits,
) -> Result<Decision, Fault> {
    let oversize = |what: &str, len: usize| {
        Fault::OversizeOutput(format!("{what} of {len} bytes, over the cap of {}", limits.max_output_bytes))
    };
    match decision {
        v0_1::RawDecision::Deny(r) if r.len() > limits.max_output_bytes => Err(oversize("reason", r.len())),
        v0_1::RawDecision::Deny(r) => Ok(Decision::Deny(r)),
        v0_1::RawDecision::RequireApproval(r) if r.len() > limits.max_output_bytes => {
            Err(oversize("reason", r.len()))
        }
        v0_1::RawDecision::RequireApproval(r) => Ok(Decision::RequireApproval(r)),
        v0_1::RawDecision::Allow { ttl_seconds, max_amount } => {
            if ttl_seconds == Some(0) {
                return Err(Fault::InvalidCardTerms("ttl-seconds must be at least 1".into()));
            }
            let max_amount = match max_amount {
                None => None,
                Some((units, scale, currency)) => {
                    if currency != request.amount.currency() {
                        return Err(Fault::InvalidCardTerms(format!(
                            "cap in `{}` for a spend in {}",
                            currency.chars().take(16).collect::<String>(),
                            request.amount.currency()
                        )));
                    }
                    let cap = crate::money::Amount::from_units_scale(units, scale, &currency)
                        .map_err(|e| Fault::InvalidCardTerms(format!("max-amount: {e}")))?;
                    Some(cap)
                }
            };
            Ok(Decision::Allow(crate::policy::CardTerms { ttl_seconds, max_amount }))
        }
    }
}

/// Turn a trap or host error into the fault the operator should read.
fn classify(err: wasmtime::Error, state: &GuestState) -> Fault {
    if let Some(fault) = &state.fault {
        return fault.clone();
    }
    match err.downcast_ref::<Trap>() {
        Some(Trap::OutOfFuel) => Fault::OutOfFuel,
        Some(Trap::Interrupt) => Fault::DeadlineExceeded,
        Some(Trap::StackOverflow) => Fault::StackOverflow,
        Some(_) | None if state.memory_refused => Fault::MemoryLimit,
        Some(Trap::UnreachableCodeReached) => match panic_message(&state.logs) {
            Some(message) => Fault::Panic(message.to_owned()),
            None => Fault::Trap("unreachable instruction executed".into()),
        },
        Some(Trap::MemoryOutOfBounds) => Fault::Trap(
            "out of bounds memory access (a policy that overflows its own Wasm stack ends here too)".into(),
        ),
        Some(trap) => Fault::Trap(trap.to_string().trim_start_matches("wasm trap: ").to_owned()),
        None => Fault::HostError(format!("{err:#}")),
    }
}

/// The SDK logs a panic's message as a warning just before the module traps.
fn panic_message(logs: &[LogLine]) -> Option<&str> {
    let last = logs.last()?;
    (last.level == LogLevel::Warn).then_some(())?;
    last.message.strip_prefix("panic: ")
}

/// A history that has nothing: `validate-config` runs without a request.
struct NoHistory;

impl History for NoHistory {
    fn summarize(
        &self,
        _: &HistoryScope,
        _: &crate::policy::SpendFilter,
    ) -> Result<crate::policy::SpendSummary, crate::history::HistoryError> {
        Err(crate::history::HistoryError("no history while validating a config".into()))
    }
}

/// Per-evaluation state the host functions see.
struct GuestState {
    history: Arc<dyn History>,
    scope: HistoryScope,
    exponent: u8,
    limits: Limits,
    history_calls: u32,
    logs: Vec<LogLine>,
    /// Set by a host function just before it traps, so the trap reports why.
    fault: Option<Fault>,
    /// A memory growth was refused: the trap that usually follows is the cap.
    memory_refused: bool,
}

impl GuestState {
    /// Record why a host function is about to trap, and make the trap.
    fn fail(&mut self, fault: Fault) -> wasmtime::Error {
        let err = wasmtime::Error::msg(fault.to_string());
        self.fault = Some(fault);
        err
    }
}

impl ResourceLimiter for GuestState {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.limits.max_memory_bytes {
            self.memory_refused = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

const WASM_PAGE_BYTES: u64 = 64 * 1024;

/// Function-table entries per instance: Rust policies use a few hundred.
const MAX_TABLE_ELEMENTS: usize = 10_000;

/// Bounds how many evaluations hold a pool slot at once; a caller over the
/// bound waits instead of failing.
struct Slots {
    free: Mutex<u32>,
    freed: Condvar,
}

struct Slot<'a>(&'a Slots);

impl Slots {
    fn new(n: u32) -> Self {
        Slots { free: Mutex::new(n), freed: Condvar::new() }
    }

    fn acquire(&self) -> Slot<'_> {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        while *free == 0 {
            free = self.freed.wait(free).unwrap_or_else(|p| p.into_inner());
        }
        *free -= 1;
        Slot(self)
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut free = self.0.free.lock().unwrap_or_else(|p| p.into_inner());
        *free += 1;
        self.0.freed.notify_one();
    }
}

/// Check the WIT a `component-type` section carries before wit-component
/// reads it: wit-parser 0.254 recurses without end, overflowing the stack
/// (which aborts the whole process), when it orders packages that depend on
/// each other in a cycle. No compiler emits one; a hostile module can
/// (found by fuzzing: `fuzz/corpus/policy_load`).
fn check_component_type(data: &[u8]) -> Result<(), LoadError> {
    // 0x03 starts the historical format of older wit-bindgen versions; the
    // SDK's is a component.
    if data.first() == Some(&0x03) {
        return Err(LoadError::Componentize(
            "component type in an outdated format: rebuild with spendguard-sdk".into(),
        ));
    }
    let (resolve, _) = wit_parser::decoding::decode_world(data)
        .map_err(|e| LoadError::Componentize(format!("component type: {e:#}")))?;
    // Take packages whose dependencies are all taken until none is left; a
    // package never taken is on a cycle.
    let deps: Vec<Vec<usize>> = resolve
        .packages
        .iter()
        .map(|(id, _)| resolve.package_direct_deps(id).map(|dep| dep.index()).collect())
        .collect();
    let mut taken = vec![false; deps.len()];
    loop {
        let ready: Vec<usize> =
            (0..deps.len()).filter(|&i| !taken[i] && deps[i].iter().all(|&d| taken[d])).collect();
        if ready.is_empty() {
            break;
        }
        for i in ready {
            taken[i] = true;
        }
    }
    if taken.contains(&false) {
        return Err(LoadError::Componentize(
            "component type: its WIT packages depend on each other in a cycle".into(),
        ));
    }
    Ok(())
}

/// Componentize a core module built with wit-bindgen, refusing foreign
/// imports first so the message names them.
fn componentize(bytes: &[u8], max_memory_bytes: usize) -> Result<Vec<u8>, LoadError> {
    wasmparser::Validator::new().validate_all(bytes).map_err(|e| LoadError::Invalid(e.to_string()))?;
    let mut has_component_type = false;
    for payload in wasmparser::Parser::new(0).parse_all(bytes) {
        match payload.map_err(|e| LoadError::Invalid(e.to_string()))? {
            wasmparser::Payload::ImportSection(section) => {
                for import in section.into_imports() {
                    let import = import.map_err(|e| LoadError::Invalid(e.to_string()))?;
                    if !import.module.starts_with(ALLOWED_CORE_IMPORT_PREFIX) {
                        return Err(LoadError::ForeignImport(format!("{}::{}", import.module, import.name)));
                    }
                }
            }
            wasmparser::Payload::MemorySection(section) => {
                for memory in section {
                    let memory = memory.map_err(|e| LoadError::Invalid(e.to_string()))?;
                    let needs = memory.initial.saturating_mul(WASM_PAGE_BYTES);
                    if needs > u64::try_from(max_memory_bytes).unwrap_or(u64::MAX) {
                        return Err(LoadError::MemoryTooLarge { needs, max: max_memory_bytes });
                    }
                }
            }
            wasmparser::Payload::CustomSection(section) if section.name().starts_with("component-type") => {
                check_component_type(section.data())?;
                has_component_type = true;
            }
            _ => {}
        }
    }
    if !has_component_type {
        return Err(LoadError::NoComponentType);
    }
    wit_component::ComponentEncoder::default()
        .validate(true)
        .module(bytes)
        .and_then(|mut encoder| encoder.encode())
        .map_err(|e| LoadError::Componentize(format!("{e:#}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the `policy_load` fuzz target: a minimal policy (every
    /// function `unreachable`) whose component type names the history
    /// interface `@1.1.0` instead of `@0.1.0`, one byte, which makes its WIT
    /// packages depend on each other. wit-parser overflowed the stack on it,
    /// aborting `policy check` and the daemon.
    #[test]
    fn a_component_type_with_a_package_cycle_is_refused() {
        let sandbox = Sandbox::new(Limits { max_concurrent: 1, ..Limits::default() }).unwrap();
        let module = include_bytes!("sandbox/testdata/component-type-cycle.bin");
        let err = sandbox.load(module).unwrap_err();
        assert!(err.to_string().contains("depend on each other in a cycle"), "{err}");

        let at = module.windows(14).position(|w| w == b"history@1.1.0\x05").unwrap();
        let mut fixed = module.to_vec();
        fixed[at + 8] = b'0';
        let policy = sandbox.load(&fixed).unwrap();
        assert_eq!(policy.exports(), ["validate-config", "evaluate"]);
    }
}
