//! Turning a core module built with wit-bindgen into a component, after the
//! checks that must come before wit-component reads it.

use super::{ALLOWED_CORE_IMPORT_PREFIX, LoadError, WASM_PAGE_BYTES};

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
pub(super) fn componentize(bytes: &[u8], max_memory_bytes: usize) -> Result<Vec<u8>, LoadError> {
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
