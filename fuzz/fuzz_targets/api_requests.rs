//! The daemon's request bodies, validated by the very functions its handlers
//! call (`spendguard::server::parse`): nothing may panic, every refusal is
//! a 4xx, and what is accepted meets the rules the handlers promise.
//!
//! Input: byte 0 picks the request (mod 8); byte 1 is the length of an
//! `Idempotency-Key` header that follows (0xFF: no header); the rest is the
//! body. Request 7 is a bare amount: `AMOUNT CURRENCY`.

#![no_main]

use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;
use spendguard::cases::{check_country, check_mcc};
use spendguard::money::{Amount, MAX_MAJOR_UNITS};
use spendguard::sandbox::DEFAULT_MAX_CONFIG_BYTES;
use spendguard::server::ApiError;
use spendguard::server::parse::{
    AttachmentRef, MAX_ATTACHMENTS, MAX_IDEMPOTENCY_KEY_CHARS, MAX_NAME_CHARS, MAX_PURPOSE_CHARS,
    parse_attachments, parse_authorization, parse_deny, parse_deposit, parse_new_agent, parse_proposal,
    policy_name,
};

fuzz_target!(|data: &[u8]| {
    let [which, key_len, rest @ ..] = data else { return };
    let (headers, body) = match *key_len {
        0xFF => (HeaderMap::new(), rest),
        n if usize::from(n) <= rest.len() => {
            let (key, body) = rest.split_at(usize::from(n));
            // What the HTTP server would refuse never reaches a handler.
            let Ok(value) = HeaderValue::from_bytes(key) else { return };
            let mut headers = HeaderMap::new();
            headers.insert("idempotency-key", value);
            (headers, body)
        }
        _ => return,
    };
    match which % 8 {
        0 => check(parse_proposal(body, &headers), |p| {
            check_amount(&p.amount);
            check_merchant_id(&p.merchant.id);
            check_text(&p.merchant.name, MAX_NAME_CHARS, false);
            check_text(&p.purpose, MAX_PURPOSE_CHARS, false);
            assert!(check_mcc("mcc", &p.merchant.mcc).is_ok());
            assert!(check_country("country", &p.merchant.country).is_ok());
            check_key(p.idempotency_key.as_deref(), &headers);
        }),
        1 => check(parse_deposit(body, &headers), |d| {
            check_amount(&d.amount);
            check_key(d.idempotency_key.as_deref(), &headers);
        }),
        2 => check(parse_new_agent(body, DEFAULT_MAX_CONFIG_BYTES), |a| {
            check_text(&a.name, MAX_NAME_CHARS, true);
            assert!(a.labels.len() <= MAX_ATTACHMENTS);
            for (k, v) in &a.labels {
                check_text(k, MAX_NAME_CHARS, true);
                check_text(v, MAX_NAME_CHARS, false);
            }
            check_attachments(&a.policies);
        }),
        3 => check(parse_attachments(body, DEFAULT_MAX_CONFIG_BYTES), |list| check_attachments(&list)),
        4 => check(parse_deny(body), |reason| check_text(&reason, MAX_PURPOSE_CHARS, false)),
        5 => check(parse_authorization(body, &headers), |a| {
            check_amount(&a.amount);
            assert!((12..=19).contains(&a.pan.len()) && a.pan.bytes().all(|b| b.is_ascii_digit()));
            assert!((3..=4).contains(&a.cvv.len()) && a.cvv.bytes().all(|b| b.is_ascii_digit()));
            assert!((1..=12).contains(&a.exp_month));
            check_merchant_id(&a.merchant_id);
            check_key(a.idempotency_key.as_deref(), &headers);
        }),
        6 => {
            let Ok(name) = std::str::from_utf8(body) else { return };
            check(policy_name(name), |()| {
                assert!(!name.is_empty() && name.len() <= 64 && !name.contains('@'));
            });
        }
        _ => {
            let Ok(text) = std::str::from_utf8(body) else { return };
            let (amount, currency) = text.split_once(' ').unwrap_or((text, "USD"));
            if let Ok(parsed) = Amount::parse(amount, currency) {
                check_amount(&parsed);
                assert_eq!(
                    exact_units(amount, parsed.exponent()).as_deref(),
                    Some(&*parsed.units().to_string())
                );
            }
        }
    }
});

/// A refusal is the client's fault (422, or 413 for an oversize config);
/// an acceptance meets `accepted`.
fn check<T>(result: Result<T, ApiError>, accepted: impl FnOnce(T)) {
    match result {
        Ok(value) => accepted(value),
        Err(e) => {
            assert!(e.status.is_client_error(), "{e:?}");
            assert!(!e.code.is_empty() && !e.message.is_empty(), "{e:?}");
        }
    }
}

/// An accepted amount is positive, within the cap, and round-trips through
/// its decimal string and its units.
fn check_amount(a: &Amount) {
    assert!(a.units() > 0, "{a:?}");
    let decimal = a.to_decimal();
    assert!(decimal > 0.into() && decimal <= MAX_MAJOR_UNITS.into(), "{a:?}");
    assert_eq!(decimal.scale(), u32::from(a.exponent()), "{a:?}");
    assert_eq!(Amount::parse(&decimal.to_string(), a.currency()).as_ref(), Ok(a));
    assert_eq!(Amount::from_units(a.units(), a.currency()).as_ref(), Ok(a));
}

/// The units a decimal string denotes, worked out on the text alone (no
/// rounding can hide in it): `None` when it has more decimals than
/// `exponent`.
fn exact_units(amount: &str, exponent: u8) -> Option<String> {
    let unsigned = amount.strip_prefix('+').unwrap_or(amount);
    let (whole, fraction) = unsigned.split_once('.').unwrap_or((unsigned, ""));
    let fraction = fraction.trim_end_matches('0');
    let pad = usize::from(exponent).checked_sub(fraction.len())?;
    let units = format!("{whole}{fraction}{}", "0".repeat(pad));
    Some(units.trim_start_matches('0').to_owned())
}

fn check_text(value: &str, max: usize, required: bool) {
    assert!(!required || !value.trim().is_empty(), "{value:?}");
    assert!(value.chars().count() <= max, "{value:?}");
    assert!(!value.chars().any(char::is_control), "{value:?}");
}

/// An accepted merchant id is text as above, and no lookalike of another.
fn check_merchant_id(id: &str) {
    check_text(id, MAX_NAME_CHARS, true);
    assert!(spendguard::lookalike::check_merchant_id(id).is_ok(), "{id:?}");
}

fn check_key(key: Option<&str>, headers: &HeaderMap) {
    assert_eq!(key.is_some(), headers.contains_key("idempotency-key"));
    if let Some(key) = key {
        assert!(!key.is_empty() && key.len() <= MAX_IDEMPOTENCY_KEY_CHARS, "{key:?}");
    }
}

fn check_attachments(list: &[AttachmentRef]) {
    assert!(list.len() <= MAX_ATTACHMENTS);
    for a in list {
        assert!(policy_name(&a.policy).is_ok(), "{a:?}");
        assert!(a.config.len() <= DEFAULT_MAX_CONFIG_BYTES, "{a:?}");
        assert!(serde_json::from_str::<serde_json::Value>(&a.config).is_ok(), "{a:?}");
    }
}
