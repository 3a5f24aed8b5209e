//! Checks of command-line input shared by the daemon verbs, so that a typo
//! is caught here (exit 2) before anything is sent. The daemon checks again:
//! these only spare a round trip and give the mistake a clear name.

use spendguard::money::Amount;

use super::UsageError;

/// An amount and its currency as the API takes them: the amount exactly as
/// typed (the daemon compares idempotent retries by it), the currency upper
/// case. Refuses what the daemon would: an unknown currency, more decimals
/// than the currency has, zero, negative and absurd amounts.
pub fn money(amount: &str, currency: &str) -> Result<(String, String), UsageError> {
    let currency = currency.trim().to_ascii_uppercase();
    Amount::parse(amount, &currency).map_err(|err| UsageError(err.to_string()))?;
    Ok((amount.to_owned(), currency))
}

/// `--label KEY=VALUE`.
pub fn label(arg: &str) -> Result<(String, String), String> {
    match arg.split_once('=') {
        Some((key, value)) if !key.trim().is_empty() => Ok((key.trim().to_owned(), value.to_owned())),
        _ => Err(format!("`{arg}` is not a label: expected KEY=VALUE")),
    }
}

/// `--policy NAME` or `--policy NAME@VERSION`.
pub fn policy_ref(arg: &str) -> Result<String, String> {
    let (name, version) = match arg.split_once('@') {
        Some((name, version)) => (name, Some(version)),
        None => (arg, None),
    };
    let bad = name.is_empty()
        || name.chars().any(char::is_whitespace)
        || version.is_some_and(|v| v.is_empty() || v.contains('@'));
    if bad {
        return Err(format!("`{arg}` is not a policy: expected NAME or NAME@VERSION"));
    }
    Ok(arg.to_owned())
}

/// `--mcc`: an ISO 18245 merchant category code, four digits.
pub fn mcc(arg: &str) -> Result<String, String> {
    if spendguard_types::is_mcc(arg) {
        Ok(arg.to_owned())
    } else {
        Err(format!("`{arg}` is not a merchant category code: expected four digits (`5734`)"))
    }
}

/// `--country`: ISO 3166-1 alpha-2, upper-cased.
pub fn country(arg: &str) -> Result<String, String> {
    let country = arg.to_ascii_uppercase();
    if !country.is_empty() && spendguard_types::is_country(&country) {
        Ok(country)
    } else {
        Err(format!("`{arg}` is not a country: expected two letters (`US`)"))
    }
}

/// A required free-text value (a merchant id, a purpose): not blank.
pub fn not_blank(arg: &str) -> Result<String, String> {
    if arg.trim().is_empty() { Err("must not be blank".to_owned()) } else { Ok(arg.to_owned()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_are_sent_as_typed_with_the_currency_upper_case() {
        assert_eq!(money("10.00", "usd").unwrap(), ("10.00".to_owned(), "USD".to_owned()));
        assert_eq!(money("0.000001", "USDC").unwrap().0, "0.000001");
        assert_eq!(money("5000", "JPY").unwrap().0, "5000");
    }

    #[test]
    fn amounts_the_daemon_would_refuse_are_refused_here() {
        for (amount, currency, message) in [
            ("10.001", "USD", "`10.001` has more decimals than USD allows (2)"),
            ("0", "USD", "amount `0` must be positive"),
            ("-5", "USD", "amount `-5` must be positive"),
            ("1e3", "USD", "`1e3` is not a decimal amount"),
            ("1,000.00", "USD", "`1,000.00` is not a decimal amount"),
            ("10", "DOGE", "unknown currency `DOGE`"),
            ("2000000000", "USD", "amount `2000000000` is over the maximum of 1000000000 USD"),
        ] {
            assert_eq!(money(amount, currency).unwrap_err().to_string(), message, "{amount} {currency}");
        }
    }

    #[test]
    fn labels_are_key_equals_value() {
        assert_eq!(label("team=research").unwrap(), ("team".into(), "research".into()));
        // Only the first `=` splits: values may hold more.
        assert_eq!(label("q=a=b").unwrap(), ("q".into(), "a=b".into()));
        assert_eq!(label("env=").unwrap(), ("env".into(), String::new()));
        assert_eq!(label("team").unwrap_err(), "`team` is not a label: expected KEY=VALUE");
        assert!(label("=x").is_err());
    }

    #[test]
    fn policy_refs_are_a_name_and_maybe_a_version() {
        assert_eq!(policy_ref("daily-limit").unwrap(), "daily-limit");
        assert_eq!(policy_ref("daily-limit@3").unwrap(), "daily-limit@3");
        for bad in ["", "@3", "daily-limit@", "a b", "a@1@2"] {
            assert!(policy_ref(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn merchant_fields_are_checked() {
        assert_eq!(mcc("5734").unwrap(), "5734");
        assert!(mcc("573").is_err() && mcc("57a4").is_err());
        assert_eq!(country("us").unwrap(), "US");
        assert!(country("USA").is_err());
        assert!(not_blank("  ").is_err());
    }
}
