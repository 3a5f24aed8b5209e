//! The shapes of the codes a spend names, checked in one place: by the
//! daemon (API bodies, cases and request files, command-line input) and, through
//! `spendguard_sdk::types`, by policies (their configs).
//!
//! Only shapes: whether a currency is one the daemon knows (and its decimals)
//! is the host's money table; a policy cannot know it and checks the shape.
//! No allocation and no dependency, so it builds for `wasm32-unknown-unknown`
//! inside a policy at no cost.

#![no_std]

/// A merchant category code (ISO 18245): four ASCII digits, `5734`.
pub fn is_mcc(code: &str) -> bool {
    code.len() == 4 && code.bytes().all(|b| b.is_ascii_digit())
}

/// A merchant's country (ISO 3166-1 alpha-2): two upper-case ASCII letters,
/// `US`, or empty when it is not known.
pub fn is_country(code: &str) -> bool {
    code.is_empty() || (code.len() == 2 && code.bytes().all(|b| b.is_ascii_uppercase()))
}

/// A currency code: three to ten upper-case ASCII letters, `USD` (ISO 4217)
/// or a longer token code such as `USDC`.
pub fn is_currency_code(code: &str) -> bool {
    (3..=10).contains(&code.len()) && code.bytes().all(|b| b.is_ascii_uppercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merchant_category_codes_are_four_digits() {
        assert!(is_mcc("5734") && is_mcc("0000"));
        for bad in ["", "573", "57345", "57a4", " 573", "５７３４", "-573"] {
            assert!(!is_mcc(bad), "{bad:?}");
        }
    }

    #[test]
    fn countries_are_two_upper_case_letters_or_empty() {
        assert!(is_country("US") && is_country(""));
        for bad in ["us", "U", "USA", "U1", " U", "ÜS"] {
            assert!(!is_country(bad), "{bad:?}");
        }
    }

    #[test]
    fn currency_codes_are_three_to_ten_upper_case_letters() {
        assert!(is_currency_code("USD") && is_currency_code("USDC") && is_currency_code("ABCDEFGHIJ"));
        for bad in ["", "US", "usd", "US1", "ABCDEFGHIJK", "U SD", "ÜSD"] {
            assert!(!is_currency_code(bad), "{bad:?}");
        }
    }
}
