//! What makes the audit trail hold against someone who can write the
//! database: a key kept in the data directory, and checkpoints kept
//! elsewhere.
//!
//! Each record's hash covers the previous record's hash, so an edit breaks
//! the chain from there on — unless whoever edited also recomputes every
//! hash after it, which a plain SHA-256 lets anyone do. From the record
//! where the data directory's key begins, each hash is an HMAC-SHA256 under
//! that key ([`AuditKey`]): without the key a record cannot be rewritten,
//! and records cannot be added, without the chain failing to verify.
//!
//! Trails begun before the key existed keep their plain SHA-256 records;
//! the key file says from which record on the hashes are keyed, so someone
//! with only the database cannot make new records plain again (a plain
//! record at or after that place fails), nor rewrite the older ones (the
//! first keyed record covers the hash of the last plain one), nor cut the
//! trail back to before that place (it is then shorter than the key file
//! says it is).
//!
//! Deleting the newest records leaves a shorter chain that still holds; a
//! [`Checkpoint`] (a record's sequence number and hash, kept somewhere the
//! database's writer cannot reach) detects that too.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
#[cfg(unix)]
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::{Digest, Sha256};
use zeroize::Zeroize;

/// Bytes of the key itself.
pub const AUDIT_KEY_LEN: usize = 32;

/// The key file: the key, then the sequence number of the first keyed record
/// (8 bytes, big-endian).
const FILE_LEN: usize = AUDIT_KEY_LEN + 8;

/// Domain prefixes of the key's MACs; part of the at-rest format.
const RECORD_DOMAIN: &[u8] = b"audit-record:";
const FINGERPRINT_DOMAIN: &[u8] = b"audit-key-fingerprint:";

type HmacSha256 = Hmac<Sha256>;

#[derive(Debug, thiserror::Error)]
pub enum AuditKeyError {
    #[error("cannot {action} audit key file `{}`: {source}", .path.display())]
    File {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("audit key file `{}` holds {len} bytes, expected {FILE_LEN}; it is left untouched", .path.display())]
    Length { path: PathBuf, len: usize },
    #[error("audit key file `{}` says keyed records begin at record 0; it is left untouched", .path.display())]
    Start { path: PathBuf },
}

/// The secret key of the audit chain's MACs, and where in the chain they
/// begin. Wiped on drop; `Debug` shows neither.
pub struct AuditKey {
    bytes: Box<[u8; AUDIT_KEY_LEN]>,
    keyed_from: u64,
}

impl AuditKey {
    /// A fresh random key whose MACs begin at record `keyed_from` (at least 1).
    pub fn generate(keyed_from: u64) -> AuditKey {
        let mut bytes = Box::new([0u8; AUDIT_KEY_LEN]);
        // ThreadRng is a CSPRNG seeded from the operating system.
        rand::RngCore::fill_bytes(&mut rand::rng(), bytes.as_mut_slice());
        AuditKey { bytes, keyed_from: keyed_from.max(1) }
    }

    /// The first record whose hash is keyed; the ones before are plain SHA-256.
    pub fn keyed_from(&self) -> u64 {
        self.keyed_from
    }

    /// Read the key file at `path`.
    pub fn load(path: &Path) -> Result<AuditKey, AuditKeyError> {
        let io_error = |source| AuditKeyError::File { action: "read", path: path.to_owned(), source };
        let mut file = File::open(path).map_err(io_error)?;
        let mut buf = zeroize::Zeroizing::new([0u8; FILE_LEN + 1]);
        let mut len = 0;
        while len < buf.len() {
            match file.read(&mut buf[len..]) {
                Ok(0) => break,
                Ok(n) => len += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_error(e)),
            }
        }
        if len != FILE_LEN {
            return Err(AuditKeyError::Length { path: path.to_owned(), len });
        }
        let mut bytes = Box::new([0u8; AUDIT_KEY_LEN]);
        bytes.copy_from_slice(&buf[..AUDIT_KEY_LEN]);
        let mut start = [0u8; 8];
        start.copy_from_slice(&buf[AUDIT_KEY_LEN..FILE_LEN]);
        let keyed_from = u64::from_be_bytes(start);
        if keyed_from == 0 {
            return Err(AuditKeyError::Start { path: path.to_owned() });
        }
        Ok(AuditKey { bytes, keyed_from })
    }

    /// Create the key file at `path` (mode 0600; it must not exist) with a
    /// fresh key whose MACs begin at record `keyed_from`.
    pub fn create(path: &Path, keyed_from: u64) -> Result<AuditKey, AuditKeyError> {
        let mut options = OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        options.mode(0o600);
        let file = options.open(path).map_err(|source| AuditKeyError::File {
            action: "create",
            path: path.to_owned(),
            source,
        })?;
        let key = AuditKey::generate(keyed_from);
        let mut content = zeroize::Zeroizing::new([0u8; FILE_LEN]);
        content[..AUDIT_KEY_LEN].copy_from_slice(key.bytes.as_slice());
        content[AUDIT_KEY_LEN..].copy_from_slice(&key.keyed_from.to_be_bytes());
        if let Err(source) = crate::cards::write_durably(file, path, content.as_slice()) {
            // Ours, and half-written: a later start would refuse it.
            let _ = std::fs::remove_file(path);
            return Err(AuditKeyError::File { action: "write", path: path.to_owned(), source });
        }
        Ok(key)
    }

    /// A value that names this key without revealing it: recorded in the
    /// trail, so a daemon given another wallet's key refuses to start.
    pub fn fingerprint(&self) -> String {
        self.mac(FINGERPRINT_DOMAIN, &[])
    }

    /// A keyed record's hash: HMAC-SHA256 over the previous hash and every
    /// field, each length-prefixed.
    pub fn record_hash(&self, prev_hash: &str, seq: u64, at_ms: u64, kind: &str, record: &str) -> String {
        let (seq, at) = (seq.to_string(), at_ms.to_string());
        self.mac(RECORD_DOMAIN, &[prev_hash, &seq, &at, kind, record])
    }

    fn mac(&self, domain: &[u8], fields: &[&str]) -> String {
        // INVARIANT: HMAC takes keys of any length.
        let Ok(mut mac) = HmacSha256::new_from_slice(self.bytes.as_slice()) else {
            unreachable!("HMAC-SHA256 takes keys of any length")
        };
        mac.update(domain);
        for field in fields {
            mac.update(&(field.len() as u64).to_le_bytes());
            mac.update(field.as_bytes());
        }
        hex::encode(mac.finalize().into_bytes())
    }
}

impl Drop for AuditKey {
    fn drop(&mut self) {
        self.bytes.as_mut_slice().zeroize();
    }
}

impl fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditKey").field("keyed_from", &self.keyed_from).finish_non_exhaustive()
    }
}

/// A record's place and hash, kept outside the machine to check the trail
/// against later: `SEQ:HASH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub seq: u64,
    pub hash: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a checkpoint is `SEQ:HASH`: a record's sequence number (1 or more) and its 64 hex digit hash")]
pub struct BadCheckpoint;

impl FromStr for Checkpoint {
    type Err = BadCheckpoint;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (seq, hash) = s.split_once(':').ok_or(BadCheckpoint)?;
        let seq_ok = !seq.is_empty() && seq.len() <= 20 && seq.bytes().all(|b| b.is_ascii_digit());
        let seq: u64 =
            if seq_ok { seq.parse().map_err(|_| BadCheckpoint)? } else { return Err(BadCheckpoint) };
        let hash_ok = hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit());
        if seq == 0 || !hash_ok {
            return Err(BadCheckpoint);
        }
        Ok(Checkpoint { seq, hash: hash.to_ascii_lowercase() })
    }
}

impl fmt::Display for Checkpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.seq, self.hash)
    }
}

/// The newest record of a trail that verified: what to keep as a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditHead {
    /// How many records the trail holds (the newest's `seq`).
    pub records: u64,
    pub seq: u64,
    pub hash: String,
}

/// One record of the audit trail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditRecord {
    pub seq: u64,
    pub at_ms: u64,
    pub kind: String,
    /// The record as stored (JSON text): what the hash covers.
    pub record: String,
    pub prev_hash: String,
    pub hash: String,
}

/// Where and why the audit chain breaks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditBreak {
    pub seq: u64,
    pub error: String,
}

/// The hash of the first record's predecessor.
pub const AUDIT_GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// A record's hash: SHA-256 over the previous hash and every field, each
/// length-prefixed, so no two records can hash alike by shifting bytes.
pub fn audit_hash(prev_hash: &str, seq: u64, at_ms: u64, kind: &str, record: &str) -> String {
    let mut h = Sha256::new();
    for part in [prev_hash, &seq.to_string(), &at_ms.to_string(), kind, record] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    hex::encode(h.finalize())
}

/// Check a run of records from the first: contiguous, chained, unaltered.
/// With `key`, records from its [`AuditKey::keyed_from`] on must carry its
/// MAC (a plain SHA-256 there was written, or rewritten, without the key),
/// and the trail must reach that far. With `checkpoint`, the record at its
/// place must still have its hash, and the trail must reach that far.
pub fn verify_chain<'a>(
    records: impl IntoIterator<Item = &'a AuditRecord>,
    key: Option<&AuditKey>,
    checkpoint: Option<&Checkpoint>,
) -> Result<AuditHead, AuditBreak> {
    let mut prev = AUDIT_GENESIS.to_owned();
    let mut n = 0;
    for r in records {
        n += 1;
        let broken = |error: &str| AuditBreak { seq: r.seq, error: error.to_owned() };
        if r.seq != n {
            return Err(broken(&format!("expected record {n}: a record is missing")));
        }
        if r.prev_hash != prev {
            return Err(broken("does not follow the previous record"));
        }
        let expected = match key {
            Some(key) if r.seq >= key.keyed_from() => {
                key.record_hash(&r.prev_hash, r.seq, r.at_ms, &r.kind, &r.record)
            }
            _ => audit_hash(&r.prev_hash, r.seq, r.at_ms, &r.kind, &r.record),
        };
        if r.hash != expected {
            return Err(broken(if key.is_some_and(|k| r.seq >= k.keyed_from()) {
                "was altered, or written without the data directory's audit key: its hash is not the key's MAC \
                 of its content"
            } else {
                "was altered: its hash does not match its content"
            }));
        }
        if let Some(cp) = checkpoint.filter(|cp| cp.seq == r.seq && cp.hash != r.hash) {
            return Err(AuditBreak {
                seq: cp.seq,
                error: format!(
                    "no longer has the checkpoint's hash {}: the trail was rewritten from here",
                    cp.hash
                ),
            });
        }
        prev = r.hash.clone();
    }
    if let Some(key) = key.filter(|k| n < k.keyed_from()) {
        return Err(AuditBreak {
            seq: n,
            error: format!(
                "the trail ends at record {n}, but the data directory's audit key signs records from {} on: \
                 records were removed",
                key.keyed_from()
            ),
        });
    }
    if let Some(cp) = checkpoint.filter(|cp| n < cp.seq) {
        return Err(AuditBreak {
            seq: n,
            error: format!(
                "the trail has {n} records, fewer than the checkpoint's {}: records were removed",
                cp.seq
            ),
        });
    }
    Ok(AuditHead { records: n, seq: n, hash: prev })
}

/// A record of the audit trail, typed: its kind and its fields. What it
/// writes is the stored format (kinds and field names as ever, so chains
/// already written still verify); the kinds not yet here are still written
/// as JSON at their call sites in `storage/sql/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditEvent<'a> {
    /// A merchant's charge, approved or declined (never its PAN or CVV).
    Authorization {
        /// `None` when no card has the charge's PAN.
        card_id: Option<&'a str>,
        amount: &'a crate::money::Amount,
        merchant_id: &'a str,
        approved: bool,
        decline_code: Option<crate::cards::DeclineCode>,
    },
    /// A card voided and its hold released: by the operator (no reason), or
    /// by an authorization (why: wrong CVVs, its agent revoked).
    CardVoid { card_id: Option<&'a str>, reason: Option<&'a str> },
}

impl AuditEvent<'_> {
    /// The record's kind, as stored beside it and covered by its hash.
    pub fn kind(&self) -> &'static str {
        match self {
            AuditEvent::Authorization { .. } => "authorization",
            AuditEvent::CardVoid { .. } => "card_void",
        }
    }

    /// The record's fields (the actor is added when it is appended).
    pub fn record(&self) -> serde_json::Value {
        use serde_json::json;
        match self {
            AuditEvent::Authorization { card_id, amount, merchant_id, approved, decline_code } => json!({
                "card_id": card_id,
                "amount": amount.to_decimal().to_string(),
                "currency": amount.currency(),
                "merchant_id": merchant_id,
                "approved": approved,
                "decline_code": decline_code.map(crate::cards::DeclineCode::as_str),
            }),
            AuditEvent::CardVoid { card_id, reason: None } => json!({ "card_id": card_id }),
            AuditEvent::CardVoid { card_id, reason: Some(reason) } => {
                json!({ "card_id": card_id, "reason": reason })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_events_write_the_records_as_stored_before() {
        let amount = crate::money::Amount::parse("12.50", "USD").unwrap();
        let charge = AuditEvent::Authorization {
            card_id: Some("card_1"),
            amount: &amount,
            merchant_id: "m_books",
            approved: false,
            decline_code: Some(crate::cards::DeclineCode::WrongCvv),
        };
        assert_eq!(charge.kind(), "authorization");
        assert_eq!(
            charge.record().to_string(),
            r#"{"amount":"12.50","approved":false,"card_id":"card_1","currency":"USD","decline_code":"wrong_cvv","merchant_id":"m_books"}"#
        );
        let unknown = AuditEvent::Authorization {
            card_id: None,
            amount: &amount,
            merchant_id: "m_books",
            approved: false,
            decline_code: Some(crate::cards::DeclineCode::CardNotFound),
        };
        assert!(unknown.record().to_string().contains(r#""card_id":null"#));
        let by_operator = AuditEvent::CardVoid { card_id: Some("card_1"), reason: None };
        assert_eq!(
            (by_operator.kind(), by_operator.record().to_string()),
            ("card_void", r#"{"card_id":"card_1"}"#.into())
        );
        let locked = AuditEvent::CardVoid {
            card_id: Some("card_1"),
            reason: Some("3 authorizations with a wrong CVV"),
        };
        assert_eq!(
            locked.record().to_string(),
            r#"{"card_id":"card_1","reason":"3 authorizations with a wrong CVV"}"#
        );
    }

    #[test]
    fn checkpoints_parse_strictly() {
        let hash = "ab".repeat(32);
        assert_eq!(format!("7:{hash}").parse(), Ok(Checkpoint { seq: 7, hash: hash.clone() }));
        assert_eq!(
            format!("7:{}", hash.to_uppercase()).parse(),
            Ok(Checkpoint { seq: 7, hash: hash.clone() })
        );
        for bad in [
            String::new(),
            "7".into(),
            format!("0:{hash}"),
            format!("-1:{hash}"),
            format!("+7:{hash}"),
            format!(" 7:{hash}"),
            format!("7:{hash}0"),
            format!("7:{}", &hash[1..]),
            format!("7:{}g", &hash[1..]),
            format!("99999999999999999999:{hash}"),
            format!("7:{hash}:1"),
        ] {
            assert_eq!(bad.parse::<Checkpoint>(), Err(BadCheckpoint), "{bad}");
        }
    }

    #[test]
    fn key_files_round_trip_and_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.key");
        let key = AuditKey::create(&path, 42).unwrap();
        let again = AuditKey::load(&path).unwrap();
        assert_eq!(again.keyed_from(), 42);
        assert_eq!(again.fingerprint(), key.fingerprint());
        assert_eq!(again.record_hash("p", 1, 2, "k", "{}"), key.record_hash("p", 1, 2, "k", "{}"));
        assert_ne!(AuditKey::generate(1).fingerprint(), key.fingerprint());
        assert!(AuditKey::create(&path, 1).is_err(), "an existing key file is never overwritten");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        std::fs::write(&path, [0u8; 12]).unwrap();
        assert!(matches!(AuditKey::load(&path), Err(AuditKeyError::Length { len: 12, .. })));
    }
}
