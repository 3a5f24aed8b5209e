//! Exact money: integer units of a currency's smallest unit inside, decimal
//! strings at the edges. No float ever touches an amount.

use std::fmt;
use std::str::FromStr;

use rust_decimal::Decimal;
use serde::Serialize;

/// The largest amount accepted, in major units of any currency (one billion
/// dollars, euros, USDC…). Far above any agent's purchase, far below where
/// `i64` units could overflow (USDC has 6 decimals: 10^15 units).
pub const MAX_MAJOR_UNITS: i64 = 1_000_000_000;

/// Currencies the host knows, with their exponent (decimal places). A
/// currency outside this table is refused rather than guessed.
const CURRENCIES: &[(&str, u8)] = &[
    ("USD", 2),
    ("EUR", 2),
    ("GBP", 2),
    ("CHF", 2),
    ("CAD", 2),
    ("AUD", 2),
    ("NZD", 2),
    ("SEK", 2),
    ("NOK", 2),
    ("DKK", 2),
    ("PLN", 2),
    ("CZK", 2),
    ("SGD", 2),
    ("HKD", 2),
    ("CNY", 2),
    ("INR", 2),
    ("BRL", 2),
    ("MXN", 2),
    ("ZAR", 2),
    ("JPY", 0),
    ("KRW", 0),
    ("ISK", 0),
    ("CLP", 0),
    ("VND", 0),
    ("BHD", 3),
    ("KWD", 3),
    ("JOD", 3),
    ("OMR", 3),
    ("TND", 3),
    ("USDC", 6),
    ("USDT", 6),
    ("PYUSD", 6),
    ("BTC", 8),
];

/// Why an amount was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("unknown currency `{0}`")]
    UnknownCurrency(String),
    #[error("`{0}` is not a decimal amount")]
    NotANumber(String),
    #[error("`{amount}` has more decimals than {currency} allows ({exponent})")]
    TooPrecise { amount: String, currency: String, exponent: u8 },
    #[error("amount `{0}` must be positive")]
    NotPositive(String),
    #[error("amount `{amount}` is over the maximum of {max} {currency}")]
    TooLarge { amount: String, currency: String, max: i64 },
}

/// The exponent of a known currency (`USD` → 2, `JPY` → 0, `USDC` → 6).
pub fn exponent(currency: &str) -> Option<u8> {
    CURRENCIES.iter().find(|(code, _)| *code == currency).map(|(_, e)| *e)
}

/// A positive amount of a known currency, in its smallest unit.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Amount {
    units: i64,
    currency: String,
    exponent: u8,
}

impl Amount {
    /// Parse a decimal string (`"12.50"`) of `currency`. Refuses an unknown
    /// currency, more decimals than the currency has, zero, negative and
    /// absurd amounts.
    pub fn parse(amount: &str, currency: &str) -> Result<Self, MoneyError> {
        if !is_plain_decimal(amount) {
            return Err(MoneyError::NotANumber(amount.to_owned()));
        }
        // A Decimal keeps 28 decimals and rounds the rest away: a literal
        // more precise than its currency is refused before it can be rounded
        // (`1.00000000000000000000000000001` is not 1.00 USD).
        let decimals = amount.split_once('.').map_or(0, |(_, fraction)| fraction.trim_end_matches('0').len());
        if let Some(exponent) = self::exponent(currency)
            && decimals > usize::from(exponent)
        {
            return Err(MoneyError::TooPrecise {
                amount: amount.to_owned(),
                currency: currency.to_owned(),
                exponent,
            });
        }
        let value = Decimal::from_str(amount).map_err(|_| MoneyError::NotANumber(amount.to_owned()))?;
        Amount::from_decimal(value, currency)
    }

    /// An exact decimal of `currency`, with the same checks as [`Amount::parse`].
    pub fn from_decimal(value: Decimal, currency: &str) -> Result<Self, MoneyError> {
        let exponent =
            self::exponent(currency).ok_or_else(|| MoneyError::UnknownCurrency(currency.to_owned()))?;
        let normalized = value.normalize();
        if normalized.scale() > u32::from(exponent) {
            return Err(MoneyError::TooPrecise {
                amount: value.to_string(),
                currency: currency.to_owned(),
                exponent,
            });
        }
        if value <= Decimal::ZERO {
            return Err(MoneyError::NotPositive(value.to_string()));
        }
        if value > Decimal::from(MAX_MAJOR_UNITS) {
            return Err(MoneyError::TooLarge {
                amount: value.to_string(),
                currency: currency.to_owned(),
                max: MAX_MAJOR_UNITS,
            });
        }
        let mut scaled = normalized;
        scaled.rescale(u32::from(exponent));
        // INVARIANT: 0 < value <= 10^9 and exponent <= 8, so the mantissa is
        // below 10^17 and fits i64; the fallback is unreachable.
        let units = i64::try_from(scaled.mantissa()).map_err(|_| MoneyError::TooLarge {
            amount: value.to_string(),
            currency: currency.to_owned(),
            max: MAX_MAJOR_UNITS,
        })?;
        Ok(Amount { units, currency: currency.to_owned(), exponent })
    }

    /// An amount given in smallest units and a scale (`1250`, scale 2 →
    /// 12.50), as policies return card caps. Same checks as [`Amount::parse`].
    pub fn from_units_scale(units: i64, scale: u8, currency: &str) -> Result<Self, MoneyError> {
        let value = Decimal::try_from_i128_with_scale(i128::from(units), u32::from(scale))
            .map_err(|_| MoneyError::NotANumber(format!("{units}e-{scale}")))?;
        Amount::from_decimal(value, currency)
    }

    /// `units` of `currency`'s smallest unit (1250 USD cents → 12.50 USD),
    /// with the checks of [`Amount::parse`].
    pub fn from_units(units: i64, currency: &str) -> Result<Self, MoneyError> {
        let exponent =
            self::exponent(currency).ok_or_else(|| MoneyError::UnknownCurrency(currency.to_owned()))?;
        Amount::from_units_scale(units, exponent, currency)
    }

    /// Units of the currency's smallest unit (cents for USD).
    pub fn units(&self) -> i64 {
        self.units
    }

    pub fn currency(&self) -> &str {
        &self.currency
    }

    /// Decimal places of the currency.
    pub fn exponent(&self) -> u8 {
        self.exponent
    }

    /// The exact decimal value (`12.50`).
    pub fn to_decimal(&self) -> Decimal {
        Decimal::new(self.units, u32::from(self.exponent))
    }
}

/// Digits with an optional sign and fraction (`12.50`, `-3`): no exponent,
/// no spaces, no thousands separators, nothing a reader could misread.
fn is_plain_decimal(s: &str) -> bool {
    let unsigned = s.strip_prefix(['-', '+']).unwrap_or(s);
    let (whole, fraction) = unsigned.split_once('.').unwrap_or((unsigned, "0"));
    let digits = |part: &str| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit());
    digits(whole) && digits(fraction)
}

/// Format `units` of a currency with `exponent` decimals (`1250`, 2 → `12.50`).
pub fn format_units(units: i64, exponent: u8) -> String {
    Decimal::new(units, u32::from(exponent)).to_string()
}

impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.to_decimal(), self.currency)
    }
}

impl Serialize for Amount {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("Amount", 2)?;
        st.serialize_field("amount", &self.to_decimal().to_string())?;
        st.serialize_field("currency", &self.currency)?;
        st.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_respect_the_currency_exponent() {
        let cases: &[(&str, &str, Result<i64, &str>)] = &[
            ("12.50", "USD", Ok(1250)),
            ("12.5", "USD", Ok(1250)),
            ("12.500", "USD", Ok(1250)),
            ("0.01", "USD", Ok(1)),
            ("0.001", "USD", Err("more decimals")),
            ("1.00000000000000000000000000001", "USD", Err("more decimals")),
            ("1.000000000000000000000000000000000000000", "USD", Ok(100)),
            ("1000", "JPY", Ok(1000)),
            ("1000.5", "JPY", Err("more decimals")),
            ("1.000001", "USDC", Ok(1_000_001)),
            ("1.0000001", "USDC", Err("more decimals")),
            ("0", "USD", Err("positive")),
            ("-5.00", "USD", Err("positive")),
            ("1000000000.01", "USD", Err("maximum")),
            ("1000000000", "USD", Ok(100_000_000_000)),
            ("99999999999999999999999", "USD", Err("maximum")),
            ("12.50", "XYZ", Err("unknown currency")),
            ("12.50", "usd", Err("unknown currency")),
            ("twelve", "USD", Err("not a decimal")),
            ("1e3", "USD", Err("not a decimal")),
            (" 12.50", "USD", Err("not a decimal")),
            ("12.", "USD", Err("not a decimal")),
            (".5", "USD", Err("not a decimal")),
            ("1,000.00", "USD", Err("not a decimal")),
            ("", "USD", Err("not a decimal")),
            ("+12.50", "USD", Ok(1250)),
        ];
        for (amount, currency, want) in cases {
            let got = Amount::parse(amount, currency);
            match (want, got) {
                (Ok(units), Ok(got)) => assert_eq!(got.units(), *units, "{amount} {currency}"),
                (Err(fragment), Err(err)) => {
                    assert!(err.to_string().contains(fragment), "{amount} {currency}: {err}")
                }
                (want, got) => panic!("{amount} {currency}: want {want:?}, got {got:?}"),
            }
        }
    }

    #[test]
    fn units_and_scale_round_trip() {
        let a = Amount::from_units_scale(1250, 2, "USD").unwrap();
        assert_eq!(a.to_string(), "12.50 USD");
        assert_eq!(Amount::from_units_scale(125, 1, "USD").unwrap().units(), 1250);
        assert!(Amount::from_units_scale(1, 3, "USD").is_err());
        assert!(Amount::from_units_scale(i64::MAX, 0, "USD").is_err());
        assert!(Amount::from_units_scale(1, 200, "USD").is_err());
    }
}
