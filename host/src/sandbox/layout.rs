//! How a core module lays out its linear memory when an instance starts: how
//! much memory it has and how much of it is its stack. Read from the module
//! itself, for `spendguard policy check`.
//!
//! Rust gives a wasm32 module a 1 MiB stack unless the build says otherwise;
//! a policy needs a few KiB. The SDK's documented build settings
//! (`-zstack-size=65536`) live in the author's `.cargo/config.toml`, which a
//! library cannot set for its dependents, so the host reports what a module
//! was built with and says when it is more than a policy needs.

use serde::Serialize;

/// The stack the SDK's build settings give a policy (`-zstack-size=65536`):
/// `policy check` warns about a module with more.
pub const RECOMMENDED_STACK_BYTES: u64 = 64 * 1024;

/// A core module's linear memory at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MemoryLayout {
    /// The memory's initial size: what every instance starts with.
    pub initial_bytes: u64,
    /// The Wasm stack within it, from the `__stack_pointer` global's initial
    /// value; `None` when the module has no global that can be told to be it.
    pub stack_bytes: Option<u64>,
}

impl MemoryLayout {
    /// A line for the author when the stack is larger than a policy needs.
    pub fn stack_warning(&self) -> Option<String> {
        let stack = self.stack_bytes.filter(|&s| s > RECOMMENDED_STACK_BYTES)?;
        Some(format!(
            "the module's stack is {} KiB, of {} KiB of memory at start; a policy needs far less: \
             build with `-C link-arg=-zstack-size={RECOMMENDED_STACK_BYTES}` (the `.cargo/config.toml` \
             in the SDK's README) for {} KiB",
            stack / 1024,
            self.initial_bytes / 1024,
            RECOMMENDED_STACK_BYTES / 1024
        ))
    }
}

/// The layout of a core module's memory, or `None` for a component or a
/// module without memory (or one that does not parse: loading it says why).
///
/// wasm-ld places the stack either first in memory (`--stack-first`, what
/// rustc asks for), from address 0 up to the stack pointer's initial value,
/// or after the static data, from `__data_end` (which Rust exports) up to it.
/// The stack pointer is the global the name section calls
/// `__stack_pointer`, or in a module without names the first mutable `i32`
/// global (wasm-ld always defines it first).
pub fn memory_layout(module: &[u8]) -> Option<MemoryLayout> {
    if !wasmparser::Parser::is_core_wasm(module) {
        return None;
    }
    let mut initial_bytes = None;
    let mut imported_globals = 0u32;
    // (index, mutable i32, initial value if an i32.const)
    let mut globals: Vec<(u32, bool, Option<i64>)> = Vec::new();
    let mut data_end_index = None;
    let mut stack_pointer_index = None;
    for payload in wasmparser::Parser::new(0).parse_all(module) {
        match payload.ok()? {
            wasmparser::Payload::ImportSection(section) => {
                for import in section.into_imports() {
                    if matches!(import.ok()?.ty, wasmparser::TypeRef::Global(_)) {
                        imported_globals += 1;
                    }
                }
            }
            wasmparser::Payload::MemorySection(section) => {
                let memory = section.into_iter().next()?.ok()?;
                initial_bytes = Some(memory.initial.saturating_mul(super::WASM_PAGE_BYTES));
            }
            wasmparser::Payload::GlobalSection(section) => {
                for (i, global) in section.into_iter().enumerate() {
                    let global = global.ok()?;
                    let index = imported_globals.checked_add(u32::try_from(i).ok()?)?;
                    let mutable_i32 = global.ty.mutable && global.ty.content_type == wasmparser::ValType::I32;
                    let init = match global.init_expr.get_operators_reader().read().ok()? {
                        wasmparser::Operator::I32Const { value } => Some(i64::from(value as u32)),
                        _ => None,
                    };
                    globals.push((index, mutable_i32, init));
                }
            }
            wasmparser::Payload::ExportSection(section) => {
                for export in section {
                    let export = export.ok()?;
                    if export.name == "__data_end" && export.kind == wasmparser::ExternalKind::Global {
                        data_end_index = Some(export.index);
                    }
                }
            }
            wasmparser::Payload::CustomSection(section) => {
                if let wasmparser::KnownCustom::Name(names) = section.as_known() {
                    for name in names {
                        if let Ok(wasmparser::Name::Global(map)) = name {
                            for naming in map.into_iter().flatten() {
                                if naming.name == "__stack_pointer" {
                                    stack_pointer_index = Some(naming.index);
                                }
                            }
                        }
                    }
                }
            }
            _ => {}
        }
    }
    let initial_bytes = initial_bytes?;
    let init_of = |index: u32| globals.iter().find(|g| g.0 == index).and_then(|g| g.2);
    let stack_pointer = match stack_pointer_index {
        Some(index) => init_of(index),
        None => globals.iter().find(|g| g.1).and_then(|g| g.2),
    };
    let stack_bytes = stack_pointer.map(|sp| {
        let sp = sp as u64;
        match data_end_index.and_then(init_of).map(|d| d as u64) {
            // The stack after the data: from its end up to the pointer.
            Some(data_end) if data_end <= sp => sp - data_end,
            // The stack first: from 0 up to the pointer.
            _ => sp,
        }
    });
    Some(MemoryLayout { initial_bytes, stack_bytes })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal core module: one memory of `pages`, the given globals
    /// (mutable, i32.const init), the given global exports, and a name
    /// section naming globals when `names` is given.
    fn module(pages: u8, globals: &[(bool, u32)], exports: &[(&str, u8)], names: &[(u8, &str)]) -> Vec<u8> {
        fn leb(mut v: u64, out: &mut Vec<u8>) {
            loop {
                let byte = (v & 0x7f) as u8;
                v >>= 7;
                if v == 0 {
                    out.push(byte);
                    return;
                }
                out.push(byte | 0x80);
            }
        }
        fn sleb(v: i64, out: &mut Vec<u8>) {
            let mut v = v;
            loop {
                let byte = (v & 0x7f) as u8;
                v >>= 7;
                let done = (v == 0 && byte & 0x40 == 0) || (v == -1 && byte & 0x40 != 0);
                out.push(if done { byte } else { byte | 0x80 });
                if done {
                    return;
                }
            }
        }
        fn section(id: u8, body: Vec<u8>, out: &mut Vec<u8>) {
            out.push(id);
            leb(body.len() as u64, out);
            out.extend(body);
        }
        fn name(s: &str, out: &mut Vec<u8>) {
            leb(s.len() as u64, out);
            out.extend(s.as_bytes());
        }
        let mut m = b"\0asm\x01\0\0\0".to_vec();
        section(5, vec![1, 0, pages], &mut m);
        let mut body = Vec::new();
        leb(globals.len() as u64, &mut body);
        for &(mutable, init) in globals {
            body.extend([0x7f, u8::from(mutable), 0x41]);
            sleb(i64::from(init as i32), &mut body);
            body.push(0x0b);
        }
        section(6, body, &mut m);
        let mut body = Vec::new();
        leb(exports.len() as u64, &mut body);
        for &(export, index) in exports {
            name(export, &mut body);
            body.extend([0x03, index]);
        }
        section(7, body, &mut m);
        if !names.is_empty() {
            let mut map = Vec::new();
            leb(names.len() as u64, &mut map);
            for &(index, global) in names {
                map.push(index);
                name(global, &mut map);
            }
            let mut body = Vec::new();
            name("name", &mut body);
            body.push(7);
            leb(map.len() as u64, &mut body);
            body.extend(map);
            section(0, body, &mut m);
        }
        wasmparser::Validator::new().validate_all(&m).expect("the test module is valid");
        m
    }

    #[test]
    fn a_stack_first_module_has_the_stack_below_the_pointer() {
        // As rustc builds with -zstack-size=65536: the stack, then the data.
        let m = module(18, &[(true, 65536), (false, 70000), (false, 80000)], &[("__data_end", 1)], &[]);
        let layout = memory_layout(&m).unwrap();
        assert_eq!(layout, MemoryLayout { initial_bytes: 18 * 65536, stack_bytes: Some(65536) });
        assert_eq!(layout.stack_warning(), None);
    }

    #[test]
    fn a_module_with_the_default_stack_is_warned_about() {
        let m = module(17, &[(true, 1 << 20), (false, (1 << 20) + 4000)], &[("__data_end", 1)], &[]);
        let layout = memory_layout(&m).unwrap();
        assert_eq!(layout.stack_bytes, Some(1 << 20));
        let warning = layout.stack_warning().unwrap();
        assert!(warning.contains("stack is 1024 KiB, of 1088 KiB"), "{warning}");
        assert!(warning.contains("-zstack-size=65536"), "{warning}");
    }

    #[test]
    fn a_stack_after_the_data_is_measured_from_the_data_end() {
        // Data up to 5000, then a 64 KiB stack.
        let m = module(2, &[(false, 5000), (true, 5000 + 65536)], &[("__data_end", 0)], &[]);
        assert_eq!(memory_layout(&m).unwrap().stack_bytes, Some(65536));
    }

    #[test]
    fn the_name_section_says_which_global_is_the_stack_pointer() {
        // Without names the first mutable i32 would be taken for it.
        let globals = [(true, 7), (true, 131072)];
        let named = module(4, &globals, &[], &[(0, "counter"), (1, "__stack_pointer")]);
        assert_eq!(memory_layout(&named).unwrap().stack_bytes, Some(131072));
        let unnamed = module(4, &globals, &[], &[]);
        assert_eq!(memory_layout(&unnamed).unwrap().stack_bytes, Some(7));
    }

    #[test]
    fn what_is_not_a_core_module_with_memory_has_no_layout() {
        assert_eq!(memory_layout(b"\0asm\x0d\0\x01\0"), None, "a component");
        assert_eq!(memory_layout(b"\0asm\x01\0\0\0"), None, "no memory");
        assert_eq!(memory_layout(b"not wasm"), None);
        let m = module(1, &[(false, 1)], &[], &[]);
        assert_eq!(memory_layout(&m).unwrap().stack_bytes, None, "no mutable i32 global");
    }
}
