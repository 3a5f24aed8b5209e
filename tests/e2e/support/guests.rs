//! Builds every Wasm guest of the repository from source, once per test run:
//! the example policies (`policies/*`) and the hostile test guests
//! (`tests/guests/*`), for wasm32-unknown-unknown in release mode, as a policy
//! author would.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The repository's root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("host/ has a parent").to_path_buf()
}

/// Crate folders holding a guest: (package name, folder).
pub fn crates(under: &str) -> Vec<(String, PathBuf)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(root().join(under)).expect("guest folder exists") {
        let dir = entry.expect("readable dir entry").path();
        let manifest = dir.join("Cargo.toml");
        let Ok(text) = std::fs::read_to_string(&manifest) else {
            continue;
        };
        let name = text
            .lines()
            .find_map(|l| l.strip_prefix("name = \"").and_then(|r| r.strip_suffix('"')))
            .unwrap_or_else(|| panic!("no package name in {}", manifest.display()))
            .to_owned();
        found.push((name, dir));
    }
    found.sort();
    found
}

/// Path of the built module of package `name`, building every guest first
/// if this run has not yet.
pub fn wasm(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(build_all);
    let path = dir.join(format!("{}.wasm", name.replace('-', "_")));
    assert!(path.exists(), "guest `{name}` was not built: {}", path.display());
    path
}

pub fn bytes(name: &str) -> Vec<u8> {
    std::fs::read(wasm(name)).expect("built guest is readable")
}

fn build_all() -> PathBuf {
    let root = root();
    // A target directory of its own: the `cargo test` that runs us may hold
    // the lock on the main one.
    let target = root.join("target").join("e2e-guests");
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(&root)
        .args(["build", "--release", "--target", "wasm32-unknown-unknown", "--quiet"])
        .env("CARGO_TARGET_DIR", &target);
    // What the outer cargo set must not leak into the guests' build (the
    // workspace's .cargo/config.toml sets the guests' flags).
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_MAKEFLAGS",
        "MAKEFLAGS",
        "MFLAGS",
    ] {
        cmd.env_remove(var);
    }
    for (name, _) in crates("policies").into_iter().chain(crates("tests/guests")) {
        cmd.args(["-p", &name]);
    }
    let status = cmd.status().expect("cargo runs");
    assert!(status.success(), "building the Wasm guests failed: {status}");
    target.join("wasm32-unknown-unknown").join("release")
}
