//! Compiled policies on disk, so a restarted daemon does not compile its
//! policies again (a compile takes a few hundred milliseconds, loading the
//! compiled artifact a few).
//!
//! Only the host writes here: an artifact is what this engine made of a
//! module that passed every load check. None is ever taken from a user (an
//! upload is always a module, compiled here). Each file carries an
//! HMAC-SHA256 of its bytes, keyed from the data directory's secret; a file
//! whose MAC does not verify (corrupted, truncated, or written by anyone
//! without the key) is never deserialized: the module is compiled again
//! and the file replaced. The file's name binds the module's hash, the
//! engine's compilation settings and the sandbox's limits, so a wasmtime
//! upgrade or a changed limit is simply a miss.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

type HmacSha256 = Hmac<Sha256>;

/// The MAC at the end of every artifact file.
const MAC_LEN: usize = 32;

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
    pub(crate) fn name(module_sha256: &str, engine: &str, limits: &str) -> String {
        let mut h = Sha256::new();
        for part in [module_sha256, engine, limits] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        format!("{}.cwasm", hex::encode(h.finalize()))
    }

    fn mac(&self, bytes: &[u8]) -> [u8; MAC_LEN] {
        // INVARIANT: HMAC takes a key of any length.
        let mut mac = HmacSha256::new_from_slice(self.key.as_slice()).unwrap_or_else(|_| unreachable!());
        mac.update(bytes);
        mac.finalize().into_bytes().into()
    }

    /// The artifact stored as `name`, if there is one and its MAC verifies.
    pub(crate) fn get(&self, name: &str) -> Option<Vec<u8>> {
        let mut bytes = fs::read(self.dir.join(name)).ok()?;
        let split = bytes.len().checked_sub(MAC_LEN)?;
        let expected = self.mac(&bytes[..split]);
        if !bool::from(subtle::ConstantTimeEq::ct_eq(&bytes[split..], &expected[..])) {
            tracing::warn!(file = name, "compiled policy fails its MAC: compiling again");
            return None;
        }
        bytes.truncate(split);
        Some(bytes)
    }

    /// Store an artifact as `name`: written aside, then renamed into place,
    /// so a reader sees a whole file or none. A failure only costs the next
    /// start a compile.
    pub(crate) fn put(&self, name: &str, artifact: &[u8]) {
        let path = self.dir.join(name);
        let tmp = self.dir.join(format!("{name}.{}.tmp", std::process::id()));
        let written = (|| {
            // Owner-only from its creation, as every file of the data
            // directory; a stale one of a crashed run is replaced.
            let _ = fs::remove_file(&tmp);
            let mut f = crate::datadir::private_file(&tmp)?;
            f.write_all(artifact)?;
            f.write_all(&self.mac(artifact))?;
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
        let name = ArtifactCache::name("abc", "engine", "limits");
        assert_eq!(cache.get(&name), None);
        cache.put(&name, b"compiled bytes");
        assert_eq!(cache.get(&name).as_deref(), Some(&b"compiled bytes"[..]));

        // Another key (another data directory) cannot vouch for it.
        let other = ArtifactCache::open(&dir.path().join("cache"), &[8; 32]).unwrap();
        assert_eq!(other.get(&name), None);

        // Any changed byte, or a truncation, and it is refused.
        let path = dir.path().join("cache").join(&name);
        let mut bytes = fs::read(&path).unwrap();
        bytes[3] ^= 1;
        fs::write(&path, &bytes).unwrap();
        assert_eq!(cache.get(&name), None);
        fs::write(&path, &bytes[..10]).unwrap();
        assert_eq!(cache.get(&name), None);
        fs::write(&path, b"").unwrap();
        assert_eq!(cache.get(&name), None);

        // Every part of the name matters.
        assert_ne!(name, ArtifactCache::name("abd", "engine", "limits"));
        assert_ne!(name, ArtifactCache::name("abc", "engine2", "limits"));
        assert_ne!(name, ArtifactCache::name("abc", "engine", "limits2"));
    }
}
