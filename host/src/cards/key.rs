//! The card key: the keyed hashes under which PANs and CVVs are stored, and
//! the key file that holds it.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use super::{AuthorizationRequest, CardError};

/// Bytes in a [`CardKey`]: 256 bits, the full strength of HMAC-SHA256, and
/// exactly what a key file holds.
pub const CARD_KEY_LEN: usize = 32;

/// Domain prefixes of the keyed hashes. Distinct prefixes mean a PAN's hash
/// and a CVV's hash can never be equal, even for the same digits. These
/// strings are part of the at-rest format: changing one orphans every stored
/// card.
const PAN_DOMAIN: &[u8] = b"pan:";
const CVV_DOMAIN: &[u8] = b"cvv:";
const FINGERPRINT_DOMAIN: &[u8] = b"key-fingerprint:";
const AUTHORIZATION_DOMAIN: &[u8] = b"authorization:";

type HmacSha256 = Hmac<Sha256>;

/// The secret key of the keyed hashes of PANs and CVVs.
///
/// Without it a stolen database is useless for recovering card numbers: a
/// PAN has only about 10^9 unknowns here, so a plain hash would be brute
/// forced in seconds. The bytes live on the heap (moving the key moves a
/// pointer, leaving no copies behind) and are wiped on drop.
pub struct CardKey {
    bytes: Box<[u8; CARD_KEY_LEN]>,
}

impl CardKey {
    /// A fresh random key.
    pub fn generate() -> CardKey {
        let mut key = CardKey::zeroed();
        // ThreadRng is a CSPRNG seeded from the operating system.
        rand::rng().fill_bytes(key.bytes.as_mut_slice());
        key
    }

    /// A key from exactly [`CARD_KEY_LEN`] bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<CardKey, CardError> {
        if bytes.len() != CARD_KEY_LEN {
            return Err(CardError::KeyLength(bytes.len()));
        }
        let mut key = CardKey::zeroed();
        key.bytes.copy_from_slice(bytes);
        Ok(key)
    }

    fn zeroed() -> CardKey {
        CardKey { bytes: Box::new([0; CARD_KEY_LEN]) }
    }

    pub fn as_bytes(&self) -> &[u8; CARD_KEY_LEN] {
        &self.bytes
    }

    /// Read the key at `path`, or create it there (mode 0600, random bytes)
    /// if there is no file.
    ///
    /// An existing file is never overwritten, whatever it holds: a file of
    /// the wrong length is an error, since replacing the key would orphan
    /// every card hashed with it. The caller creates the parent directory.
    pub fn load_or_create(path: &Path) -> Result<CardKey, CardError> {
        match CardKey::load(path) {
            Err(CardError::KeyFile { source, .. }) if source.kind() == io::ErrorKind::NotFound => {}
            loaded => return loaded,
        }
        let created = OpenOptions::new().write(true).create_new(true).mode(0o600).open(path);
        let file = match created {
            Ok(file) => file,
            // Another process created it between our read and our create:
            // theirs wins, as it may already be in use.
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => return CardKey::load(path),
            Err(source) => {
                return Err(CardError::KeyFile { action: "create", path: path.to_owned(), source });
            }
        };
        let key = CardKey::generate();
        if let Err(source) = write_durably(file, path, key.as_bytes()) {
            // We created the file, so removing it is safe; a half-written key
            // left behind would be refused on every later start.
            let _ = fs::remove_file(path);
            return Err(CardError::KeyFile { action: "write", path: path.to_owned(), source });
        }
        Ok(key)
    }

    fn load(path: &Path) -> Result<CardKey, CardError> {
        let io_error = |source| CardError::KeyFile { action: "read", path: path.to_owned(), source };
        let mut file = File::open(path).map_err(io_error)?;
        // One byte more than a key, to tell a long file from a right one
        // without reading all of it.
        let mut buf = Zeroizing::new([0u8; CARD_KEY_LEN + 1]);
        let len = read_up_to(&mut file, buf.as_mut_slice()).map_err(io_error)?;
        if len != CARD_KEY_LEN {
            return Err(CardError::KeyFileLength {
                path: path.to_owned(),
                len: if len > CARD_KEY_LEN { file.metadata().map_or(len, |m| m.len() as usize) } else { len },
            });
        }
        CardKey::from_bytes(&buf[..CARD_KEY_LEN])
    }

    /// The keyed hash (hex HMAC-SHA256) under which a PAN is stored and
    /// looked up. Deterministic for a key; the PAN is hashed exactly as
    /// given, so callers pass digits only.
    pub fn hash_pan(&self, pan: &str) -> String {
        self.keyed_hash(PAN_DOMAIN, &[pan.as_bytes()])
    }

    /// The keyed hash of a card's CVV, bound to the card id: equal CVVs of two
    /// cards hash differently, and a stored hash copied to another card's row
    /// does not verify there.
    pub fn hash_cvv(&self, card_id: &str, cvv: &str) -> String {
        self.keyed_hash(CVV_DOMAIN, &[card_id.as_bytes(), cvv.as_bytes()])
    }

    /// A value that names this key without revealing anything of it (a
    /// keyed hash of a fixed label): daemons that share a wallet check
    /// against it that they hold the same key.
    pub fn fingerprint(&self) -> String {
        self.keyed_hash(FINGERPRINT_DOMAIN, &[])
    }

    /// What must match for a retried authorization (the same
    /// `Idempotency-Key`) to be the same charge: every field of it, keyed, so
    /// the stored value reveals neither the PAN nor the CVV.
    pub fn authorization_fingerprint(&self, request: &AuthorizationRequest) -> String {
        self.keyed_hash(
            AUTHORIZATION_DOMAIN,
            &[
                request.pan.as_bytes(),
                request.cvv.as_bytes(),
                &[request.exp_month],
                &request.exp_year.to_be_bytes(),
                &request.amount.units().to_be_bytes(),
                request.amount.currency().as_bytes(),
                request.merchant_id.as_bytes(),
            ],
        )
    }

    /// Whether `cvv` is the CVV of `card_id` whose stored hash is
    /// `stored_hash`, compared in constant time.
    pub fn verify_cvv(&self, card_id: &str, cvv: &str, stored_hash: &str) -> bool {
        let computed = self.hash_cvv(card_id, cvv);
        computed.as_bytes().ct_eq(stored_hash.as_bytes()).into()
    }

    /// HMAC-SHA256 over the domain prefix and each field preceded by its
    /// length, so no two different field lists feed the same bytes.
    fn keyed_hash(&self, domain: &[u8], fields: &[&[u8]]) -> String {
        // INVARIANT: HMAC accepts keys of any length; `new_from_slice` only
        // has a Result because the `Mac` trait covers fixed-key MACs too.
        let Ok(mut mac) = HmacSha256::new_from_slice(self.bytes.as_slice()) else {
            unreachable!("HMAC-SHA256 takes keys of any length")
        };
        mac.update(domain);
        for field in fields {
            mac.update(&(field.len() as u64).to_be_bytes());
            mac.update(field);
        }
        hex::encode(mac.finalize().into_bytes())
    }
}

impl Drop for CardKey {
    fn drop(&mut self) {
        self.bytes.as_mut_slice().zeroize();
    }
}

impl ZeroizeOnDrop for CardKey {}

impl fmt::Debug for CardKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CardKey(..)")
    }
}

/// Write `bytes` to the new `file` and make both the data and the file's
/// directory entry durable: losing the key after cards were issued would
/// make every one of them unrecognisable.
pub(crate) fn write_durably(mut file: File, path: &Path, bytes: &[u8]) -> io::Result<()> {
    file.write_all(bytes)?;
    file.sync_all()?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(parent)?.sync_all()
}

/// Fill as much of `buf` as the reader has, stopping at end of file.
fn read_up_to(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(filled)
}
