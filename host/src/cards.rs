//! Cards: the engine-free logic of the built-in simulated issuer.
//!
//! A card is a 16-digit Luhn-valid PAN from a test BIN range, a CVV, an
//! expiry month/year, a cap, a merchant lock and a time to live. Its PAN and
//! CVV exist in clear only in [`CardSecrets`], handed to the proposing agent
//! once; at rest the host keeps keyed hashes ([`CardKey::hash_pan`],
//! [`CardKey::hash_cvv`]) and the last four digits.
//!
//! A merchant's charge is decided by [`decide`], a pure function of the
//! stored card ([`CardView`]), the [`AuthorizationRequest`] and the clock.
//! Storage finds the card (by the PAN's keyed hash) and records the outcome.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use hmac::{Hmac, Mac};
use rand::{Rng, RngCore};
use serde::Serialize;
use sha2::Sha256;
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::money::Amount;

/// The issuer identification number of every simulated card: the first six
/// digits of each PAN. `400000` lies in the range card networks and issuer
/// sandboxes reserve for testing, so a simulated card can never be confused
/// with, or charged as, a real one.
pub const TEST_BIN: &str = "400000";

/// A card's time to live when no policy narrows it: 15 minutes, long enough
/// for an agent to finish one checkout, short enough that a leaked card is
/// soon worthless.
pub const DEFAULT_CARD_TTL_SECONDS: u32 = 900;

/// The longest time to live a card may have. Equal to the default on purpose:
/// policies may only narrow a card's terms, never widen them.
pub const MAX_CARD_TTL_SECONDS: u32 = DEFAULT_CARD_TTL_SECONDS;

/// Digits in a PAN: the BIN, the account digits, one check digit.
const PAN_LEN: usize = 16;

/// Digits in a CVV.
const CVV_LEN: usize = 3;

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

/// Why a card operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CardError {
    #[error("a card key must be {CARD_KEY_LEN} bytes, got {0}")]
    KeyLength(usize),
    #[error(
        "card key file `{}` holds {len} bytes, expected {CARD_KEY_LEN}; it is left untouched",
        .path.display()
    )]
    KeyFileLength { path: PathBuf, len: usize },
    #[error("cannot {action} card key file `{}`: {source}", .path.display())]
    KeyFile {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("card time to live must be between 1 and {MAX_CARD_TTL_SECONDS} seconds, got {0}")]
    Ttl(u32),
    #[error("card expiry time `{0}` ms is out of range")]
    ExpiryOutOfRange(u64),
    #[error("unknown card state `{0}`")]
    UnknownState(String),
    #[error("unknown decline code `{0}`")]
    UnknownDeclineCode(String),
}

// ---------------------------------------------------------------------------
// Luhn

/// Whether `pan` is all ASCII digits (at least two) and passes the Luhn
/// check. Spaces, dashes and other separators make it invalid.
pub fn luhn_valid(pan: &str) -> bool {
    let Some((payload, check)) = pan.split_at_checked(pan.len().saturating_sub(1)) else {
        return false;
    };
    if payload.is_empty() || !pan.bytes().all(|b| b.is_ascii_digit()) {
        return false;
    }
    luhn_check_digit(payload) == check.as_bytes()[0] - b'0'
}

/// The digit that makes `payload` followed by it Luhn-valid. `payload` must
/// be ASCII digits (callers check).
fn luhn_check_digit(payload: &str) -> u8 {
    // From the right, every second digit of the payload is doubled (the check
    // digit itself, appended later, is the undoubled rightmost one).
    let sum: u32 = payload
        .bytes()
        .rev()
        .enumerate()
        .map(|(i, b)| {
            let d = u32::from(b - b'0');
            if i % 2 == 0 {
                let doubled = d * 2;
                if doubled > 9 { doubled - 9 } else { doubled }
            } else {
                d
            }
        })
        .sum();
    // The value is below 10, so the cast is lossless.
    ((10 - sum % 10) % 10) as u8
}

// ---------------------------------------------------------------------------
// The key

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

// ---------------------------------------------------------------------------
// Issuing

/// A card's PAN and CVV in clear: shown once to the proposing agent, never
/// stored or logged. Wiped on drop; `Debug` shows only the last four digits.
///
/// Deliberately not `Serialize`: the one place that shows them writes them
/// out explicitly.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct CardSecrets {
    pub pan: String,
    pub cvv: String,
}

impl CardSecrets {
    /// The last four digits of the PAN, which may be stored and shown.
    pub fn last4(&self) -> &str {
        self.pan.get(self.pan.len().saturating_sub(4)..).unwrap_or("")
    }
}

impl fmt::Debug for CardSecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CardSecrets").field("pan", &masked_pan(&self.pan)).field("cvv", &"***").finish()
    }
}

/// A PAN as a receipt shows it: `**** 1234`. Only a full-length all-digit
/// number shows its last four; on anything shorter or odd (as an untrusted
/// authorization request may carry) the last four could be most of it.
fn masked_pan(pan: &str) -> String {
    if pan.len() >= 12 && pan.bytes().all(|b| b.is_ascii_digit()) {
        format!("**** {}", pan.get(pan.len() - 4..).unwrap_or(""))
    } else {
        "****".to_owned()
    }
}

/// What the host asks an issuer for: one card bound to one purchase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CardRequest {
    pub card_id: String,
    pub cap: Amount,
    pub merchant_id: String,
    /// Between 1 and [`MAX_CARD_TTL_SECONDS`].
    pub ttl_seconds: u32,
    /// The clock of the issue, in Unix milliseconds.
    pub now_ms: u64,
}

/// A card as issued. `secrets` go to the agent once; everything else may be
/// stored.
#[derive(Debug)]
pub struct IssuedCard {
    pub card_id: String,
    pub secrets: CardSecrets,
    pub last4: String,
    /// Calendar month (1–12, UTC) of `expires_at_ms`.
    pub exp_month: u8,
    /// Calendar year (UTC) of `expires_at_ms`.
    pub exp_year: u16,
    /// The instant the card stops authorizing, in Unix milliseconds.
    pub expires_at_ms: u64,
    /// The most it may be charged, in its currency.
    pub cap: Amount,
    /// The only merchant it works at.
    pub merchant_id: String,
}

/// Something that issues cards: the built-in [`SimulatedIssuer`] today, real
/// issuers (Stripe Issuing, Lithic) later.
pub trait Issuer: Send + Sync {
    /// A short stable name, for the audit trail and logs.
    fn name(&self) -> &'static str;

    /// Issue one card for `request`.
    fn issue(&self, request: &CardRequest) -> Result<IssuedCard, CardError>;
}

/// The local simulated card network: cards from [`TEST_BIN`] with random
/// digits, authorized by [`decide`].
#[derive(Debug, Clone, Copy, Default)]
pub struct SimulatedIssuer;

impl SimulatedIssuer {
    pub fn new() -> SimulatedIssuer {
        SimulatedIssuer
    }
}

impl Issuer for SimulatedIssuer {
    fn name(&self) -> &'static str {
        "simulated"
    }

    fn issue(&self, request: &CardRequest) -> Result<IssuedCard, CardError> {
        if request.ttl_seconds == 0 || request.ttl_seconds > MAX_CARD_TTL_SECONDS {
            return Err(CardError::Ttl(request.ttl_seconds));
        }
        let expires_at_ms = request
            .now_ms
            .checked_add(u64::from(request.ttl_seconds) * 1000)
            .ok_or(CardError::ExpiryOutOfRange(request.now_ms))?;
        let (exp_month, exp_year) = expiry_month_year(expires_at_ms)?;

        let mut rng = rand::rng();
        let secrets = CardSecrets { pan: random_pan(&mut rng), cvv: random_digits(&mut rng, CVV_LEN) };
        Ok(IssuedCard {
            card_id: request.card_id.clone(),
            last4: secrets.last4().to_owned(),
            secrets,
            exp_month,
            exp_year,
            expires_at_ms,
            cap: request.cap.clone(),
            merchant_id: request.merchant_id.clone(),
        })
    }
}

/// [`TEST_BIN`], random account digits, the Luhn check digit.
///
/// Only 10^9 account numbers exist under one BIN, so two cards share a PAN
/// with probability n²/2·10⁻⁹ after n cards: storage must keep PAN hashes
/// unique and have a clash reissued.
fn random_pan(rng: &mut impl Rng) -> String {
    // Built in place at its final capacity: growing a String would leave
    // unwiped copies of the digits in freed memory.
    let mut pan = String::with_capacity(PAN_LEN);
    pan.push_str(TEST_BIN);
    for _ in 0..PAN_LEN - TEST_BIN.len() - 1 {
        pan.push(random_digit(rng));
    }
    let check = luhn_check_digit(&pan);
    pan.push(char::from(b'0' + check));
    pan
}

fn random_digits(rng: &mut impl Rng, len: usize) -> String {
    let mut digits = String::with_capacity(len);
    for _ in 0..len {
        digits.push(random_digit(rng));
    }
    digits
}

fn random_digit(rng: &mut impl Rng) -> char {
    char::from(b'0' + rng.random_range(0..10u8))
}

/// The calendar month and year (UTC) of an instant in Unix milliseconds.
fn expiry_month_year(at_ms: u64) -> Result<(u8, u16), CardError> {
    let out_of_range = || CardError::ExpiryOutOfRange(at_ms);
    let seconds = i64::try_from(at_ms / 1000).map_err(|_| out_of_range())?;
    let at = time::OffsetDateTime::from_unix_timestamp(seconds).map_err(|_| out_of_range())?;
    let year = u16::try_from(at.year()).map_err(|_| out_of_range())?;
    Ok((u8::from(at.month()), year))
}

// ---------------------------------------------------------------------------
// Authorizing

/// Why an authorization was declined. The strings are a stable contract
/// with merchants (docs/contract.md, "Cards and the card network").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeclineCode {
    /// No card has this PAN.
    CardNotFound,
    /// The CVV or the expiry month/year does not match the card.
    WrongCvv,
    /// The card's time to live has passed.
    CardExpired,
    /// The card has already been charged.
    CardUsed,
    /// The operator voided the card.
    CardVoided,
    /// The amount is above the card's cap.
    OverLimit,
    /// The amount is not in the card's currency.
    WrongCurrency,
    /// The charging merchant is not the one the card is locked to.
    WrongMerchant,
}

impl DeclineCode {
    /// Every code, in the order [`decide`] checks them (a locked-out card
    /// declines `card_voided` before its CVV is checked).
    pub const ALL: [DeclineCode; 8] = [
        DeclineCode::CardNotFound,
        DeclineCode::WrongCvv,
        DeclineCode::CardUsed,
        DeclineCode::CardVoided,
        DeclineCode::CardExpired,
        DeclineCode::WrongCurrency,
        DeclineCode::WrongMerchant,
        DeclineCode::OverLimit,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DeclineCode::CardNotFound => "card_not_found",
            DeclineCode::WrongCvv => "wrong_cvv",
            DeclineCode::CardExpired => "card_expired",
            DeclineCode::CardUsed => "card_used",
            DeclineCode::CardVoided => "card_voided",
            DeclineCode::OverLimit => "over_limit",
            DeclineCode::WrongCurrency => "wrong_currency",
            DeclineCode::WrongMerchant => "wrong_merchant",
        }
    }
}

impl FromStr for DeclineCode {
    type Err = CardError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DeclineCode::ALL
            .into_iter()
            .find(|code| code.as_str() == s)
            .ok_or_else(|| CardError::UnknownDeclineCode(s.to_owned()))
    }
}

impl fmt::Display for DeclineCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a card is in its life. Only an `Open` card can be charged; the
/// other states are final.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CardState {
    Open,
    Used,
    Voided,
    Expired,
}

impl CardState {
    pub fn as_str(self) -> &'static str {
        match self {
            CardState::Open => "open",
            CardState::Used => "used",
            CardState::Voided => "voided",
            CardState::Expired => "expired",
        }
    }
}

impl fmt::Display for CardState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for CardState {
    type Err = CardError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "open" => Ok(CardState::Open),
            "used" => Ok(CardState::Used),
            "voided" => Ok(CardState::Voided),
            "expired" => Ok(CardState::Expired),
            other => Err(CardError::UnknownState(other.to_owned())),
        }
    }
}

/// A stored card as [`decide`] needs it: what storage hands over after
/// looking a card up by the keyed hash of the request's PAN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CardView {
    pub card_id: String,
    pub cvv_hash: String,
    pub exp_month: u8,
    pub exp_year: u16,
    pub cap: Amount,
    pub merchant_id: String,
    pub expires_at_ms: u64,
    pub state: CardState,
    /// How many authorizations of this card were declined `wrong_cvv`
    /// before this one.
    pub wrong_cvv_tries: u32,
    /// The card's agent was revoked.
    pub agent_revoked: bool,
}

/// After this many authorizations with a wrong CVV (or expiry) a card is
/// voided and its hold released: a probe gets this many guesses of a
/// 3-digit CVV, never a thousand.
pub const MAX_WRONG_CVV: u32 = 3;

/// A merchant's charge as the card network delivers it. The PAN and CVV are
/// wiped on drop and never shown by `Debug`.
pub struct AuthorizationRequest {
    pub pan: String,
    pub cvv: String,
    pub exp_month: u8,
    pub exp_year: u16,
    pub amount: Amount,
    pub merchant_id: String,
    /// The network's `Idempotency-Key`: a retry with the same key gets the
    /// first answer and moves no money twice.
    pub idempotency_key: Option<String>,
}

impl Drop for AuthorizationRequest {
    fn drop(&mut self) {
        self.pan.zeroize();
        self.cvv.zeroize();
    }
}

impl fmt::Debug for AuthorizationRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthorizationRequest")
            .field("pan", &masked_pan(&self.pan))
            .field("cvv", &"***")
            .field("exp_month", &self.exp_month)
            .field("exp_year", &self.exp_year)
            .field("amount", &self.amount)
            .field("merchant_id", &self.merchant_id)
            .field("idempotency_key", &self.idempotency_key)
            .finish()
    }
}

/// Approve or decline a charge of `card` (`None`: no card has the request's
/// PAN) at `now_ms`. Pure: the caller captures the charge and closes the
/// card on approval.
///
/// The checks run in this order, and the first failing one is the answer:
///
/// 1. `card_not_found`: no card has this PAN.
/// 2. `card_voided` once the card has had [`MAX_WRONG_CVV`] authorizations
///    with a wrong CVV, whatever this one's CVV: the lockout is checked
///    before the CVV, so once it is reached no answer tells a right CVV from
///    a wrong one.
/// 3. `wrong_cvv`: the card data. A wrong expiry month/year counts as wrong
///    card data and is reported (and counted towards the lockout) as
///    `wrong_cvv`, as a real network declines a mistyped expiry, and without
///    a code of its own the expiry is no easier to guess than the CVV.
///    Checking card data before anything else means that someone holding
///    only a PAN learns nothing about the card's state, agent, currency,
///    merchant or cap, and every wrong guess counts: a later decline
///    (`wrong_merchant`, say) can tell a right CVV only to a probe that has
///    guessed it within its [`MAX_WRONG_CVV`] tries.
/// 4. `card_voided` when the card's agent was revoked (revoking voids its
///    open cards; this holds even for one that escaped).
/// 5. `card_used`, `card_voided`, `card_expired`: the card's life. A closed
///    card says so whatever the amount, so a merchant knows a retry is futile.
///    A card still `Open` in storage but past `expires_at_ms` is expired.
/// 6. `wrong_currency`, `wrong_merchant`, `over_limit`: the purchase.
///    Currency first, since amounts in different currencies cannot be
///    compared; merchant before the cap, so only the merchant the card is
///    locked to can probe the cap.
pub fn decide(
    key: &CardKey,
    card: Option<&CardView>,
    request: &AuthorizationRequest,
    now_ms: u64,
) -> Result<(), DeclineCode> {
    let Some(card) = card else {
        return Err(DeclineCode::CardNotFound);
    };
    if card.wrong_cvv_tries >= MAX_WRONG_CVV {
        return Err(DeclineCode::CardVoided);
    }
    let cvv_ok = key.verify_cvv(&card.card_id, &request.cvv, &card.cvv_hash);
    let expiry_ok = card.exp_month == request.exp_month && card.exp_year == request.exp_year;
    // Non-short-circuiting `&`: the CVV is always checked, whatever the expiry.
    if !(cvv_ok & expiry_ok) {
        return Err(DeclineCode::WrongCvv);
    }
    if card.agent_revoked {
        return Err(DeclineCode::CardVoided);
    }
    match card.state {
        CardState::Used => return Err(DeclineCode::CardUsed),
        CardState::Voided => return Err(DeclineCode::CardVoided),
        CardState::Expired => return Err(DeclineCode::CardExpired),
        CardState::Open if now_ms >= card.expires_at_ms => return Err(DeclineCode::CardExpired),
        CardState::Open => {}
    }
    if request.amount.currency() != card.cap.currency() {
        return Err(DeclineCode::WrongCurrency);
    }
    if request.merchant_id != card.merchant_id {
        return Err(DeclineCode::WrongMerchant);
    }
    if request.amount.units() > card.cap.units() {
        return Err(DeclineCode::OverLimit);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::os::unix::fs::PermissionsExt;

    use rand::SeedableRng;
    use rand::rngs::StdRng;
    use time::format_description::well_known::Rfc3339;

    use super::*;

    fn unix_ms(rfc3339: &str) -> u64 {
        let at = time::OffsetDateTime::parse(rfc3339, &Rfc3339).unwrap();
        u64::try_from(at.unix_timestamp()).unwrap() * 1000
    }

    fn usd(amount: &str) -> Amount {
        Amount::parse(amount, "USD").unwrap()
    }

    fn eur(amount: &str) -> Amount {
        Amount::parse(amount, "EUR").unwrap()
    }

    fn card_request(ttl_seconds: u32, now_ms: u64) -> CardRequest {
        CardRequest {
            card_id: "card_1".to_owned(),
            cap: usd("50.00"),
            merchant_id: "m_books".to_owned(),
            ttl_seconds,
            now_ms,
        }
    }

    #[test]
    fn luhn_accepts_known_valid_numbers_and_refuses_others() {
        for valid in [
            "4111111111111111",
            "4242424242424242",
            "5555555555554444",
            "378282246310005",
            "79927398713",
            "4000000000000002",
            "00",
        ] {
            assert!(luhn_valid(valid), "{valid} should be valid");
        }
        for invalid in [
            "4111111111111112",
            "4242424242424241",
            "79927398710",
            "79927398714",
            "4111 1111 1111 1111",
            "4111-1111-1111-1111",
            "411111111111111a",
            "0",
            "",
            "٤١١١",
        ] {
            assert!(!luhn_valid(invalid), "{invalid} should be invalid");
        }
    }

    #[test]
    fn check_digit_completes_a_valid_number() {
        assert_eq!(luhn_check_digit("7992739871"), 3);
        assert_eq!(luhn_check_digit("411111111111111"), 1);
        assert_eq!(luhn_check_digit("400000000000000"), 2);
    }

    #[test]
    fn issued_cards_are_well_formed() {
        let issuer = SimulatedIssuer::new();
        let now = unix_ms("2026-06-01T12:00:00Z");
        let mut pans = HashSet::new();
        let mut cvvs = HashSet::new();
        for _ in 0..1000 {
            let card = issuer.issue(&card_request(900, now)).unwrap();
            let pan = &card.secrets.pan;
            assert_eq!(pan.len(), 16, "{pan}");
            assert!(pan.starts_with(TEST_BIN), "{pan}");
            assert!(luhn_valid(pan), "{pan}");
            assert_eq!(card.last4, pan[12..]);
            assert_eq!(card.secrets.last4(), &pan[12..]);
            let cvv = &card.secrets.cvv;
            assert!(cvv.len() == 3 && cvv.bytes().all(|b| b.is_ascii_digit()));
            assert_eq!(card.expires_at_ms, now + 900_000);
            assert_eq!((card.exp_month, card.exp_year), (6, 2026));
            pans.insert(pan.clone());
            cvvs.insert(cvv.clone());
        }
        // 10^9 account numbers: 1,000 random cards collide with probability
        // about 5·10⁻⁴, and three collisions are practically impossible
        // (~10⁻¹¹). Allowing two keeps the test from flaking while still
        // catching digits that are not random.
        assert!(pans.len() >= 998, "only {} distinct PANs", pans.len());
        // 1,000 draws from 1,000 CVVs give about 632 distinct values.
        assert!(cvvs.len() > 500, "only {} distinct CVVs", cvvs.len());
    }

    #[test]
    fn generated_pans_are_distinct() {
        // Seeded, so exact distinctness is a stable assertion.
        let mut rng = StdRng::seed_from_u64(7);
        let pans: HashSet<String> = (0..1000).map(|_| random_pan(&mut rng)).collect();
        assert_eq!(pans.len(), 1000);
    }

    #[test]
    fn issue_refuses_a_ttl_out_of_range() {
        let issuer = SimulatedIssuer::new();
        for ttl in [0, MAX_CARD_TTL_SECONDS + 1, u32::MAX] {
            let err = issuer.issue(&card_request(ttl, 0)).unwrap_err();
            assert!(matches!(err, CardError::Ttl(t) if t == ttl), "{err}");
            assert!(err.to_string().contains("between 1 and 900"), "{err}");
        }
        assert!(issuer.issue(&card_request(1, 0)).is_ok());
        assert!(issuer.issue(&card_request(MAX_CARD_TTL_SECONDS, 0)).is_ok());
        assert!(matches!(
            issuer.issue(&card_request(900, u64::MAX)).unwrap_err(),
            CardError::ExpiryOutOfRange(_)
        ));
    }

    #[test]
    fn expiry_is_the_month_the_card_expires_in() {
        let issuer = SimulatedIssuer::new();
        let cases = [
            ("2026-11-30T23:50:00Z", 900, (12, 2026)),
            ("2026-11-30T23:44:59Z", 900, (11, 2026)),
            ("2026-12-31T23:59:00Z", 900, (1, 2027)),
            ("2028-02-28T23:59:00Z", 900, (2, 2028)),
            ("2028-02-29T23:59:00Z", 900, (3, 2028)),
            ("2026-01-01T00:00:00Z", 1, (1, 2026)),
        ];
        for (now, ttl, want) in cases {
            let card = issuer.issue(&card_request(ttl, unix_ms(now))).unwrap();
            assert_eq!((card.exp_month, card.exp_year), want, "{now} + {ttl}s");
        }
    }

    #[test]
    fn hashes_are_keyed_and_domain_separated() {
        let key = CardKey::from_bytes(&[7; 32]).unwrap();
        let other = CardKey::from_bytes(&[8; 32]).unwrap();
        let pan = "4000001234567899";

        assert_eq!(key.hash_pan(pan), key.hash_pan(pan));
        assert_eq!(key.hash_pan(pan).len(), 64);
        assert_ne!(key.hash_pan(pan), other.hash_pan(pan));
        assert_ne!(key.hash_pan(pan), key.hash_pan("4000001234567881"));

        assert_eq!(key.hash_cvv("card_1", "123"), key.hash_cvv("card_1", "123"));
        assert_ne!(key.hash_cvv("card_1", "123"), other.hash_cvv("card_1", "123"));
        assert_ne!(key.hash_cvv("card_1", "123"), key.hash_cvv("card_2", "123"));
        // Field boundaries are unambiguous.
        assert_ne!(key.hash_cvv("card_1", "23"), key.hash_cvv("card_", "123"));
        // Same digits, different domains.
        assert_ne!(key.hash_pan("123"), key.hash_cvv("", "123"));
        assert_ne!(key.hash_pan("card_1123"), key.hash_cvv("card_1", "123"));
    }

    #[test]
    fn verify_cvv_accepts_only_the_right_cvv_of_the_right_card() {
        let key = CardKey::generate();
        let stored = key.hash_cvv("card_1", "123");
        assert!(key.verify_cvv("card_1", "123", &stored));
        assert!(!key.verify_cvv("card_1", "124", &stored));
        assert!(!key.verify_cvv("card_2", "123", &stored));
        assert!(!key.verify_cvv("card_1", "123", ""));
        assert!(!key.verify_cvv("card_1", "123", &stored[..63]));
        assert!(!CardKey::generate().verify_cvv("card_1", "123", &stored));
    }

    #[test]
    fn keys_are_random_and_exactly_32_bytes() {
        assert_ne!(CardKey::generate().as_bytes(), CardKey::generate().as_bytes());
        for len in [0, 31, 33, 64] {
            let err = CardKey::from_bytes(&vec![1; len]).unwrap_err();
            assert!(matches!(err, CardError::KeyLength(l) if l == len), "{err}");
        }
        assert_eq!(CardKey::from_bytes(&[9; 32]).unwrap().as_bytes(), &[9; 32]);
    }

    #[test]
    fn key_file_is_created_private_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("card.key");

        let created = CardKey::load_or_create(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
        assert_eq!(fs::read(&path).unwrap(), created.as_bytes());

        let reloaded = CardKey::load_or_create(&path).unwrap();
        assert_eq!(reloaded.as_bytes(), created.as_bytes());
        assert_eq!(reloaded.hash_pan("4000001234567899"), created.hash_pan("4000001234567899"));
    }

    #[test]
    fn an_existing_key_file_is_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("card.key");
        fs::write(&path, [42; 32]).unwrap();
        assert_eq!(CardKey::load_or_create(&path).unwrap().as_bytes(), &[42; 32]);
        assert_eq!(fs::read(&path).unwrap(), [42; 32]);

        for len in [0, 31, 33, 100] {
            let contents = vec![5; len];
            fs::write(&path, &contents).unwrap();
            let err = CardKey::load_or_create(&path).unwrap_err();
            assert!(matches!(&err, CardError::KeyFileLength { len: l, .. } if *l == len), "{len}: {err}");
            assert!(err.to_string().contains("card.key"), "{err}");
            assert_eq!(fs::read(&path).unwrap(), contents, "file changed");
        }
    }

    #[test]
    fn key_file_errors_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing-dir").join("card.key");
        let err = CardKey::load_or_create(&path).unwrap_err();
        assert!(matches!(err, CardError::KeyFile { action: "create", .. }), "{err}");
        assert!(err.to_string().contains("missing-dir"), "{err}");
    }

    // --- decide ---------------------------------------------------------

    const NOW: u64 = 1_790_000_000_000;

    fn open_card(key: &CardKey) -> CardView {
        CardView {
            card_id: "card_1".to_owned(),
            cvv_hash: key.hash_cvv("card_1", "123"),
            exp_month: 12,
            exp_year: 2026,
            cap: usd("50.00"),
            merchant_id: "m_books".to_owned(),
            expires_at_ms: NOW + 900_000,
            state: CardState::Open,
            wrong_cvv_tries: 0,
            agent_revoked: false,
        }
    }

    fn charge() -> AuthorizationRequest {
        AuthorizationRequest {
            pan: "4000001234567899".to_owned(),
            cvv: "123".to_owned(),
            exp_month: 12,
            exp_year: 2026,
            amount: usd("12.50"),
            merchant_id: "m_books".to_owned(),
            idempotency_key: None,
        }
    }

    /// One authorization: a stored card, a charge and the clock, each test
    /// case starting from an open card and a matching charge.
    struct Scenario {
        card: CardView,
        request: AuthorizationRequest,
        now: u64,
    }

    type Edit = fn(&mut Scenario);

    fn run(key: &CardKey, edit: Edit) -> Result<(), DeclineCode> {
        let mut s = Scenario { card: open_card(key), request: charge(), now: NOW };
        edit(&mut s);
        decide(key, Some(&s.card), &s.request, s.now)
    }

    #[test]
    fn every_decline_code_is_reachable() {
        use DeclineCode as D;
        let key = CardKey::generate();
        let cases: &[(&str, Edit, Result<(), DeclineCode>)] = &[
            ("approve", |_| {}, Ok(())),
            ("exactly the cap", |s| s.request.amount = usd("50.00"), Ok(())),
            ("last millisecond", |s| s.now = NOW + 899_999, Ok(())),
            ("wrong cvv", |s| s.request.cvv = "124".to_owned(), Err(D::WrongCvv)),
            ("empty cvv", |s| s.request.cvv.clear(), Err(D::WrongCvv)),
            ("wrong month", |s| s.request.exp_month = 11, Err(D::WrongCvv)),
            ("wrong year", |s| s.request.exp_year = 2027, Err(D::WrongCvv)),
            ("used", |s| s.card.state = CardState::Used, Err(D::CardUsed)),
            ("voided", |s| s.card.state = CardState::Voided, Err(D::CardVoided)),
            ("expired", |s| s.card.state = CardState::Expired, Err(D::CardExpired)),
            ("past ttl", |s| s.now = NOW + 900_000, Err(D::CardExpired)),
            ("currency", |s| s.request.amount = eur("12.50"), Err(D::WrongCurrency)),
            ("merchant", |s| s.request.merchant_id = "m_x".to_owned(), Err(D::WrongMerchant)),
            ("over cap", |s| s.request.amount = usd("50.01"), Err(D::OverLimit)),
        ];
        assert_eq!(decide(&key, None, &charge(), NOW), Err(D::CardNotFound));
        let mut reached = HashSet::from([D::CardNotFound]);
        for (name, edit, want) in cases {
            let got = run(&key, *edit);
            assert_eq!(got, *want, "{name}");
            if let Err(code) = got {
                reached.insert(code);
            }
        }
        assert_eq!(reached, HashSet::from(D::ALL));
    }

    #[test]
    fn card_data_is_checked_before_anything_else() {
        use DeclineCode as D;
        let key = CardKey::generate();
        let cases: &[(&str, Edit, DeclineCode)] = &[
            (
                "wrong cvv on a used card",
                |s| {
                    s.card.state = CardState::Used;
                    s.request.cvv = "999".to_owned();
                },
                D::WrongCvv,
            ),
            (
                "wrong expiry on a voided card",
                |s| {
                    s.card.state = CardState::Voided;
                    s.request.exp_month = 1;
                },
                D::WrongCvv,
            ),
            (
                "wrong cvv past ttl",
                |s| {
                    s.now = NOW + 900_000;
                    s.request.cvv = "999".to_owned();
                },
                D::WrongCvv,
            ),
            (
                "wrong cvv, wrong merchant, over cap",
                |s| {
                    s.request.cvv = "999".to_owned();
                    s.request.merchant_id = "m_x".to_owned();
                    s.request.amount = usd("99");
                },
                D::WrongCvv,
            ),
            (
                "used and past ttl",
                |s| {
                    s.card.state = CardState::Used;
                    s.now = NOW + 900_000;
                },
                D::CardUsed,
            ),
            (
                "voided, wrong merchant",
                |s| {
                    s.card.state = CardState::Voided;
                    s.request.merchant_id = "m_x".to_owned();
                },
                D::CardVoided,
            ),
            (
                "past ttl, over cap",
                |s| {
                    s.now = NOW + 900_000;
                    s.request.amount = usd("99");
                },
                D::CardExpired,
            ),
            (
                "currency before merchant",
                |s| {
                    s.request.amount = eur("99");
                    s.request.merchant_id = "m_x".to_owned();
                },
                D::WrongCurrency,
            ),
            (
                "merchant before cap",
                |s| {
                    s.request.amount = usd("99");
                    s.request.merchant_id = "m_x".to_owned();
                },
                D::WrongMerchant,
            ),
        ];
        for (name, edit, want) in cases {
            assert_eq!(run(&key, *edit), Err(*want), "{name}");
        }
    }

    #[test]
    fn a_locked_out_card_declines_voided_whatever_the_cvv_and_a_revoked_agent_s_card_too() {
        use DeclineCode as D;
        let key = CardKey::generate();
        let cases: &[(&str, Edit, Result<(), DeclineCode>)] = &[
            ("two wrong tries so far, right cvv", |s| s.card.wrong_cvv_tries = 2, Ok(())),
            (
                "two wrong tries so far, wrong cvv",
                |s| {
                    s.card.wrong_cvv_tries = 2;
                    s.request.cvv = "999".to_owned();
                },
                Err(D::WrongCvv),
            ),
            ("locked out, right cvv", |s| s.card.wrong_cvv_tries = MAX_WRONG_CVV, Err(D::CardVoided)),
            (
                "locked out, wrong cvv",
                |s| {
                    s.card.wrong_cvv_tries = MAX_WRONG_CVV;
                    s.request.cvv = "999".to_owned();
                },
                Err(D::CardVoided),
            ),
            (
                "locked out, used, wrong merchant",
                |s| {
                    s.card.wrong_cvv_tries = MAX_WRONG_CVV + 5;
                    s.card.state = CardState::Used;
                    s.request.merchant_id = "m_x".to_owned();
                },
                Err(D::CardVoided),
            ),
            ("agent revoked, open card", |s| s.card.agent_revoked = true, Err(D::CardVoided)),
            (
                "agent revoked, wrong cvv: the card data first",
                |s| {
                    s.card.agent_revoked = true;
                    s.request.cvv = "999".to_owned();
                },
                Err(D::WrongCvv),
            ),
        ];
        for (name, edit, want) in cases {
            assert_eq!(run(&key, *edit), *want, "{name}");
        }
    }

    #[test]
    fn decline_codes_parse_from_their_strings() {
        for code in DeclineCode::ALL {
            assert_eq!(code.as_str().parse::<DeclineCode>().unwrap(), code);
        }
        assert!(
            matches!("nope".parse::<DeclineCode>(), Err(CardError::UnknownDeclineCode(s)) if s == "nope")
        );
    }

    #[test]
    fn authorization_fingerprints_cover_every_field_and_the_key() {
        let key = CardKey::generate();
        let base = key.authorization_fingerprint(&charge());
        assert_eq!(base, key.authorization_fingerprint(&charge()));
        assert_ne!(base, CardKey::generate().authorization_fingerprint(&charge()));
        let edits: [fn(&mut AuthorizationRequest); 7] = [
            |r| r.pan = "4000001234567898".to_owned(),
            |r| r.cvv = "124".to_owned(),
            |r| r.exp_month = 11,
            |r| r.exp_year = 2027,
            |r| r.amount = usd("12.51"),
            |r| r.amount = eur("12.50"),
            |r| r.merchant_id = "m_x".to_owned(),
        ];
        for edit in edits {
            let mut r = charge();
            edit(&mut r);
            assert_ne!(key.authorization_fingerprint(&r), base, "{r:?}");
        }
        let mut keyed = charge();
        keyed.idempotency_key = Some("k".to_owned());
        assert_eq!(key.authorization_fingerprint(&keyed), base, "the key itself is not part of it");
    }

    #[test]
    fn a_cvv_hash_of_another_card_or_key_does_not_verify() {
        let key = CardKey::generate();
        let mut card = open_card(&key);
        card.cvv_hash = key.hash_cvv("card_2", "123");
        assert_eq!(decide(&key, Some(&card), &charge(), NOW), Err(DeclineCode::WrongCvv));
        let card = open_card(&key);
        assert_eq!(decide(&CardKey::generate(), Some(&card), &charge(), NOW), Err(DeclineCode::WrongCvv));
    }

    #[test]
    fn codes_serialize_as_their_stable_strings() {
        let want = [
            "card_not_found",
            "wrong_cvv",
            "card_used",
            "card_voided",
            "card_expired",
            "wrong_currency",
            "wrong_merchant",
            "over_limit",
        ];
        for (code, want) in DeclineCode::ALL.into_iter().zip(want) {
            assert_eq!(code.as_str(), want);
            assert_eq!(code.to_string(), want);
            assert_eq!(serde_json::to_string(&code).unwrap(), format!("\"{want}\""));
        }
        for state in [CardState::Open, CardState::Used, CardState::Voided, CardState::Expired] {
            assert_eq!(state.as_str().parse::<CardState>().unwrap(), state);
            assert_eq!(serde_json::to_string(&state).unwrap(), format!("\"{}\"", state.as_str()));
        }
        assert!(matches!(
            "closed".parse::<CardState>(),
            Err(CardError::UnknownState(s)) if s == "closed"
        ));
    }

    #[test]
    fn debug_never_shows_pan_or_cvv() {
        let pan = "4000005555123477";
        let cvv = "987";
        let secrets = CardSecrets { pan: pan.to_owned(), cvv: cvv.to_owned() };
        let shown = format!("{secrets:?}");
        assert_eq!(shown, r#"CardSecrets { pan: "**** 3477", cvv: "***" }"#);
        assert_eq!(secrets.last4(), "3477");

        let mut request = charge();
        request.pan = pan.to_owned();
        request.cvv = cvv.to_owned();
        let shown = format!("{request:?} {request:#?}");
        assert!(shown.contains("**** 3477"), "{shown}");

        // An odd PAN shows nothing of itself.
        request.pan = "98765".to_owned();
        let odd = format!("{request:?}");
        assert!(!odd.contains("8765"), "{odd}");

        let issued = SimulatedIssuer::new().issue(&card_request(900, NOW)).unwrap();
        let issued_shown = format!("{issued:?} {issued:#?}");

        for text in [&shown, &format!("{secrets:#?}"), &odd] {
            assert!(!text.contains(pan), "{text}");
            assert!(!text.contains(&pan[..12]), "{text}");
            assert!(!text.contains(cvv), "{text}");
        }
        // A random card's CVV digits may occur by chance in its last four,
        // so only the quoted CVV is looked for.
        assert!(!issued_shown.contains(&issued.secrets.pan[..12]), "{issued_shown}");
        let quoted_cvv = format!("\"{}\"", issued.secrets.cvv);
        assert!(!issued_shown.contains(&quoted_cvv), "{issued_shown}");
        assert!(issued_shown.contains(r#"cvv: "***""#), "{issued_shown}");

        let key = CardKey::from_bytes(&[0xab; 32]).unwrap();
        let shown = format!("{key:?} {key:#?}");
        assert_eq!(shown, "CardKey(..) CardKey(..)");
    }
}
