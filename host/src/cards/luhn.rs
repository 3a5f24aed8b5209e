//! The Luhn check digit of card numbers.

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
pub(super) fn luhn_check_digit(payload: &str) -> u8 {
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
