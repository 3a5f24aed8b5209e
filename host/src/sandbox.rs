//! The policy sandbox: load a policy module once, then evaluate each spend in
//! a fresh, bounded instance. Every fault becomes a deny (fail closed).
//!
//! This is the only place that knows about wasmtime. One bindings module per
//! released WIT version (`v0_1`, `v0_2`) converts between the engine and
//! [`crate::policy`]; a module's version is read from the interfaces it
//! imports, and every version is loaded and evaluated side by side.

mod cache;
mod componentize;
mod fault;
mod guest;
mod layout;
mod limits;
mod v0_1;
mod v0_2;

pub use cache::ArtifactCache;
use cache::ArtifactKey;
pub use layout::{MemoryLayout, RECOMMENDED_STACK_BYTES, memory_layout};

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, Linker};
use wasmtime::{
    Config, Enabled, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, WasmBacktraceDetails,
};

use componentize::componentize;
pub use fault::{Fault, LoadError, LogLevel, LogLine, fault_reason};
use guest::WASM_PAGE_BYTES;
use guest::{GuestState, NoHistory, Slots, check_decision, classify};
pub use limits::*;

use crate::history::{History, HistoryScope};
use crate::policy::{Decision, SpendRequest};

/// Linear memory each pooled slot keeps resident between evaluations.
const KEEP_RESIDENT_BYTES: usize = 2 * 1024 * 1024;

/// How often the engine's epoch advances; the deadline is counted in these.
pub const EPOCH_TICK: Duration = Duration::from_millis(1);

/// The only interfaces a policy may import: the `spend-policy` world's, of
/// one released version.
const ALLOWED_IMPORTS: &[&str] = &[
    "spendguard:policy/types@0.1.0",
    "spendguard:policy/history@0.1.0",
    "spendguard:policy/log@0.1.0",
    "spendguard:policy/types@0.2.0",
    "spendguard:policy/history@0.2.0",
    "spendguard:policy/log@0.2.0",
];
/// Core-module import namespaces that wit-bindgen emits for those interfaces.
const ALLOWED_CORE_IMPORT_PREFIX: &str = "spendguard:policy/";
const REQUIRED_EXPORTS: &[&str] = &["validate-config", "evaluate"];

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
    V0_2(v0_2::SpendPolicyPre<GuestState>),
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
    /// The contract version, `spendguard:policy@0.2.0` or `@0.1.0`.
    pub fn world(&self) -> &'static str {
        match self.bindings {
            Bindings::V0_1(_) => v0_1::WORLD,
            Bindings::V0_2(_) => v0_2::WORLD,
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
        v0_2::add_to_linker(&mut linker)?;

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
        let bindings = self.bindings(&component, &imports)?;
        // Stored only once every check has passed.
        if let (Some(cache), false) = (&self.cache, from_cache) {
            match component.serialize() {
                Ok(artifact) => cache.put(&key, &artifact),
                Err(e) => tracing::warn!(error = %e, "cannot serialize a compiled policy"),
            }
        }
        Ok(LoadedPolicy { sha256, size: bytes.len(), imports, exports, bindings, from_cache })
    }

    /// The bindings of the contract version the component was built
    /// against: the version its imports name (one only), or, for a component
    /// that imports none of the world's interfaces, the version its exports
    /// match (the newest first).
    fn bindings(&self, component: &Component, imports: &[String]) -> Result<Bindings, LoadError> {
        let wrong = |e: wasmtime::Error| LoadError::WrongExports(format!("{e:#}"));
        let mut versions: Vec<&str> =
            imports.iter().filter_map(|i| i.rsplit_once('@').map(|(_, v)| v)).collect();
        versions.sort_unstable();
        versions.dedup();
        let pre = self.linker.instantiate_pre(component).map_err(wrong)?;
        match versions.as_slice() {
            ["0.1.0"] => Ok(Bindings::V0_1(v0_1::SpendPolicyPre::new(pre).map_err(wrong)?)),
            ["0.2.0"] => Ok(Bindings::V0_2(v0_2::SpendPolicyPre::new(pre).map_err(wrong)?)),
            [] => match v0_2::SpendPolicyPre::new(pre.clone()) {
                Ok(pre) => Ok(Bindings::V0_2(pre)),
                Err(_) => Ok(Bindings::V0_1(v0_1::SpendPolicyPre::new(pre).map_err(wrong)?)),
            },
            several => Err(LoadError::WrongExports(format!(
                "imports the interfaces of several contract versions ({}): a policy is built against one",
                several.join(", ")
            ))),
        }
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
            Bindings::V0_2(pre) => v0_2::validate_config(pre, store, config),
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
            Bindings::V0_2(pre) => v0_2::evaluate(pre, store, request, config),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A component that imports `interfaces` (each an instance of which it
    /// uses nothing) and exports the policy's two functions as `func()`.
    fn component_importing(interfaces: &[&str]) -> Vec<u8> {
        use wasm_encoder::{
            Alias, CanonicalFunctionSection, CodeSection, Component, ComponentAliasSection,
            ComponentExportKind, ComponentExportSection, ComponentImportSection, ComponentTypeRef,
            ComponentTypeSection, ExportKind, ExportSection, Function, FunctionSection, InstanceSection,
            InstanceType, Instruction, Module, ModuleArg, ModuleSection, TypeSection,
        };
        let mut module = Module::new();
        let mut types = TypeSection::new();
        types.ty().function([], []);
        module.section(&types);
        let mut functions = FunctionSection::new();
        functions.function(0);
        module.section(&functions);
        let mut exports = ExportSection::new();
        exports.export("f", ExportKind::Func, 0);
        module.section(&exports);
        let mut code = CodeSection::new();
        let mut body = Function::new([]);
        body.instruction(&Instruction::End);
        code.function(&body);
        module.section(&code);

        let mut component = Component::new();
        let mut types = ComponentTypeSection::new();
        types.instance(&InstanceType::new());
        types.function().params([] as [(&str, wasm_encoder::ComponentValType); 0]).result(None);
        component.section(&types);
        let mut imports = ComponentImportSection::new();
        for interface in interfaces {
            imports.import(*interface, ComponentTypeRef::Instance(0));
        }
        component.section(&imports);
        component.section(&ModuleSection(&module));
        let mut instances = InstanceSection::new();
        instances.instantiate(0, [] as [(&str, ModuleArg); 0]);
        component.section(&instances);
        let mut aliases = ComponentAliasSection::new();
        aliases.alias(Alias::CoreInstanceExport { instance: 0, kind: ExportKind::Func, name: "f" });
        component.section(&aliases);
        let mut lifted = CanonicalFunctionSection::new();
        lifted.lift(0, 1, []);
        component.section(&lifted);
        let mut exports = ComponentExportSection::new();
        exports.export("validate-config", ComponentExportKind::Func, 0, None);
        exports.export("evaluate", ComponentExportKind::Func, 0, None);
        component.section(&exports);
        component.finish()
    }

    /// A policy is built against one contract: a module that imports the
    /// interfaces of two versions is refused, rather than run under a guess
    /// at its version.
    #[test]
    fn a_module_importing_both_contract_versions_is_refused() {
        let sandbox = Sandbox::new(Limits { max_concurrent: 1, ..Limits::default() }).unwrap();
        let both = component_importing(&["spendguard:policy/log@0.1.0", "spendguard:policy/log@0.2.0"]);
        let err = sandbox.load(&both).unwrap_err();
        assert!(
            err.to_string().contains("imports the interfaces of several contract versions (0.1.0, 0.2.0)"),
            "{err}"
        );
        // One version gets as far as its bindings, which find the exports wrong.
        for one in ["spendguard:policy/log@0.1.0", "spendguard:policy/history@0.2.0"] {
            let err = sandbox.load(&component_importing(&[one])).unwrap_err();
            assert!(matches!(err, LoadError::WrongExports(_)), "{one}: {err}");
            assert!(!err.to_string().contains("several contract versions"), "{one}: {err}");
        }
    }

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
