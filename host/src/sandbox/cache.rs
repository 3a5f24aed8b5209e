//! Compiled policies on disk, so a restarted daemon does not compile its
//! policies again (a compile takes a few hundred milliseconds, loading the
//! compiled artifact a few).
//!
//! Only the host writes here: an artifact is what this engine made of a
//! module that passed every load check. None is ever taken from a user (an
//! upload is always a module, compiled here). Each file carries an
//! HMAC-SHA256, keyed from the data directory's secret, over what the
//! artifact is *for* — the module's sha256, the engine's fingerprint
//! (wasmtime's version, the target, every setting that shapes compiled code:
//! fuel metering, epoch interruption, stack and memory bounds, features) and
//! the sandbox's limits — and then its bytes. A file whose MAC does not
//! verify for the artifact it is asked for (corrupted, truncated, written by
//! anyone without the key, or another module's artifact copied over this
//! one's name, or one compiled under other limits or another engine) is
//! never deserialized: the module is compiled again from its stored bytes
//! and the file replaced. The file's name binds the same three parts, so a
//! wasmtime upgrade or a changed limit is simply a miss.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

type HmacSha256 = Hmac<Sha256>;

/// The MAC at the end of every artifact file.
const MAC_LEN: usize = 32;

/// What an artifact was compiled from, and for: it is used only for exactly
/// this module, engine and sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ArtifactKey<'a> {
    /// Hex sha256 of the module as uploaded.
    pub module_sha256: &'a str,
    /// The engine's compatibility fingerprint.
    pub engine: &'a str,
    /// The sandbox's limits, serialized.
    pub limits: &'a str,
}

impl ArtifactKey<'_> {
    /// The three parts, each length-prefixed, so no two keys read alike.
    fn feed(&self, sink: &mut impl FnMut(&[u8])) {
        for part in [self.module_sha256, self.engine, self.limits] {
            sink(&(part.len() as u64).to_le_bytes());
            sink(part.as_bytes());
        }
    }
}

/// A directory of compiled policies.
pub struct ArtifactCache {
    dir: PathBuf,
    key: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for ArtifactCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArtifactCache").field("dir", &self.dir).finish_non_exhaustive()
    }
}

impl ArtifactCache {
    /// The cache in `dir` (created, owner-only), its MAC key derived from
    /// `secret` (the data directory's key; a label keeps the two uses apart).
    pub fn open(dir: &Path, secret: &[u8]) -> std::io::Result<Self> {
        crate::datadir::private_dir(dir)?;
        let mut mac = HmacSha256::new_from_slice(secret)
            .map_err(|e| std::io::Error::other(format!("cache key: {e}")))?;
        mac.update(b"spendguard compiled-policy cache v1");
        let mut key = Zeroizing::new([0u8; 32]);
        key.copy_from_slice(&mac.finalize().into_bytes());
        Ok(ArtifactCache { dir: dir.to_path_buf(), key })
    }

    /// The file name of a module's artifact: its hash, the engine's
    /// compatibility and the limits, hashed together.
    pub(crate) fn name(key: &ArtifactKey<'_>) -> String {
        let mut h = Sha256::new();
        key.feed(&mut |b| h.update(b));
        format!("{}.cwasm", hex::encode(h.finalize()))
    }

    /// The MAC of `artifact` as the compiled form of `key`: the key is part
    /// of what is authenticated, so the bytes vouch only for that module,
    /// engine and limits.
    fn mac(&self, key: &ArtifactKey<'_>, artifact: &[u8]) -> [u8; MAC_LEN] {
        // INVARIANT: HMAC takes a key of any length.
        let mut mac = HmacSha256::new_from_slice(self.key.as_slice()).unwrap_or_else(|_| unreachable!());
        mac.update(b"spendguard compiled policy v2\0");
        key.feed(&mut |b| mac.update(b));
        mac.update(artifact);
        mac.finalize().into_bytes().into()
    }

    /// The artifact compiled from exactly `key`, if the cache has one and its
    /// MAC verifies for that key. Anything else is a miss, logged (the
    /// module's hash and the file's name, nothing secret).
    pub(crate) fn get(&self, key: &ArtifactKey<'_>) -> Option<Vec<u8>> {
        let name = Self::name(key);
        let mut bytes = fs::read(self.dir.join(&name)).ok()?;
        let Some(split) = bytes.len().checked_sub(MAC_LEN) else {
            tracing::warn!(file = %name, module_sha256 = key.module_sha256, "compiled policy is truncated: compiling again");
            return None;
        };
        let expected = self.mac(key, &bytes[..split]);
        if !bool::from(subtle::ConstantTimeEq::ct_eq(&bytes[split..], &expected[..])) {
            tracing::warn!(
                file = %name,
                module_sha256 = key.module_sha256,
                "compiled policy fails its MAC (tampered, or not compiled from this module with this engine and limits): compiling again"
            );
            return None;
        }
        bytes.truncate(split);
        Some(bytes)
    }

    /// Store the artifact compiled from `key`: written aside, then renamed
    /// into place, so a reader sees a whole file or none. A failure only
    /// costs the next start a compile.
    pub(crate) fn put(&self, key: &ArtifactKey<'_>, artifact: &[u8]) {
        let name = Self::name(key);
        let name = name.as_str();
        let path = self.dir.join(name);
        let tmp = self.dir.join(format!("{name}.{}.tmp", std::process::id()));
        let written = (|| {
            // Owner-only from its creation, as every file of the data
            // directory; a stale one of a crashed run is replaced.
            let _ = fs::remove_file(&tmp);
            let mut f = crate::datadir::private_file(&tmp)?;
            f.write_all(artifact)?;
            f.write_all(&self.mac(key, artifact))?;
            f.sync_all()?;
            fs::rename(&tmp, &path)
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            tracing::warn!(file = name, error = %e, "cannot store a compiled policy");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_artifact_comes_back_only_with_its_mac() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ArtifactCache::open(&dir.path().join("cache"), &[7; 32]).unwrap();
        let key = ArtifactKey { module_sha256: "abc", engine: "engine", limits: "limits" };
        let name = ArtifactCache::name(&key);
        assert_eq!(cache.get(&key), None);
        cache.put(&key, b"compiled bytes");
        assert_eq!(cache.get(&key).as_deref(), Some(&b"compiled bytes"[..]));

        // Another key (another data directory) cannot vouch for it.
        let other = ArtifactCache::open(&dir.path().join("cache"), &[8; 32]).unwrap();
        assert_eq!(other.get(&key), None);

        // Any changed byte, or a truncation, and it is refused.
        let path = dir.path().join("cache").join(&name);
        let mut bytes = fs::read(&path).unwrap();
        bytes[3] ^= 1;
        fs::write(&path, &bytes).unwrap();
        assert_eq!(cache.get(&key), None);
        fs::write(&path, &bytes[..10]).unwrap();
        assert_eq!(cache.get(&key), None);
        fs::write(&path, b"").unwrap();
        assert_eq!(cache.get(&key), None);

        // Every part of the name matters.
        for other in [
            ArtifactKey { module_sha256: "abd", ..key },
            ArtifactKey { engine: "engine2", ..key },
            ArtifactKey { limits: "limits2", ..key },
        ] {
            assert_ne!(name, ArtifactCache::name(&other));
        }
    }

    /// A valid artifact of one module, copied over another's file name (or
    /// one compiled for another engine or other limits), is a miss: its MAC
    /// vouches only for what it was compiled from.
    #[test]
    fn an_artifact_is_used_only_for_what_it_was_compiled_from() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ArtifactCache::open(&dir.path().join("cache"), &[7; 32]).unwrap();
        let genuine = ArtifactKey { module_sha256: "restrictive", engine: "engine", limits: "limits" };
        cache.put(&genuine, b"restrictive's code");
        for source in [
            ArtifactKey { module_sha256: "permissive", ..genuine },
            ArtifactKey { engine: "other engine", ..genuine },
            ArtifactKey { limits: "other limits", ..genuine },
        ] {
            cache.put(&source, b"other code");
            fs::copy(
                dir.path().join("cache").join(ArtifactCache::name(&source)),
                dir.path().join("cache").join(ArtifactCache::name(&genuine)),
            )
            .unwrap();
            assert_eq!(cache.get(&genuine), None, "{source:?} swapped in");
            assert_eq!(cache.get(&source).as_deref(), Some(&b"other code"[..]));
        }
    }
}
