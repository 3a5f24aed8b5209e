//! The cards' unit tests: Luhn, the key, issuing and authorizing.

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;

use rand::SeedableRng;
use rand::rngs::StdRng;
use time::format_description::well_known::Rfc3339;

use super::issuing::random_pan;
use super::luhn::luhn_check_digit;
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

// --- charge_outcome ---------------------------------------------------------

const NOW: u64 = 1_790_000_000_000;

fn open_card(key: &CardKey) -> CardView {
    CardView {
        record: CardRecord {
            id: "card_1".to_owned(),
            spend_id: "spd_1".to_owned(),
            agent_id: "agt_1".to_owned(),
            issuer: "simulated".to_owned(),
            last4: "7899".to_owned(),
            exp_month: 12,
            exp_year: 2026,
            cap: usd("50.00"),
            merchant_id: "m_books".to_owned(),
            expires_at_ms: NOW + 900_000,
            state: CardState::Open,
            captured_units: None,
        },
        cvv_hash: key.hash_cvv("card_1", "123"),
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
    charge_outcome(key, Some(&s.card), &s.request, s.now)
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
        ("used", |s| s.card.record.state = CardState::Used, Err(D::CardUsed)),
        ("voided", |s| s.card.record.state = CardState::Voided, Err(D::CardVoided)),
        ("expired", |s| s.card.record.state = CardState::Expired, Err(D::CardExpired)),
        ("past ttl", |s| s.now = NOW + 900_000, Err(D::CardExpired)),
        ("currency", |s| s.request.amount = eur("12.50"), Err(D::WrongCurrency)),
        ("merchant", |s| s.request.merchant_id = "m_x".to_owned(), Err(D::WrongMerchant)),
        ("over cap", |s| s.request.amount = usd("50.01"), Err(D::OverLimit)),
    ];
    assert_eq!(charge_outcome(&key, None, &charge(), NOW), Err(D::CardNotFound));
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
                s.card.record.state = CardState::Used;
                s.request.cvv = "999".to_owned();
            },
            D::WrongCvv,
        ),
        (
            "wrong expiry on a voided card",
            |s| {
                s.card.record.state = CardState::Voided;
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
                s.card.record.state = CardState::Used;
                s.now = NOW + 900_000;
            },
            D::CardUsed,
        ),
        (
            "voided, wrong merchant",
            |s| {
                s.card.record.state = CardState::Voided;
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
                s.card.record.state = CardState::Used;
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
    assert!(matches!("nope".parse::<DeclineCode>(), Err(CardError::UnknownDeclineCode(s)) if s == "nope"));
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
    assert_eq!(charge_outcome(&key, Some(&card), &charge(), NOW), Err(DeclineCode::WrongCvv));
    let card = open_card(&key);
    assert_eq!(charge_outcome(&CardKey::generate(), Some(&card), &charge(), NOW), Err(DeclineCode::WrongCvv));
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
