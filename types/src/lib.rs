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

/// Which past spends a history query counts, in one place: the host's
/// fixed histories (`policy eval`, `policy test`) and the SDK's test host
/// answer with it. The daemon answers from its ledger with a SQL query that
/// says the same (`summarize_query` in the host's SQL storage).
pub mod history {
    /// A history query, with the scope it is asked in.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Query<'a> {
        /// The request's currency: amounts are never converted.
        pub currency: &'a str,
        /// The requesting agent.
        pub agent_id: &'a str,
        /// Spends at or after this instant (milliseconds since the epoch).
        pub since_ms: u64,
        /// Only spends at this merchant.
        pub merchant_id: Option<&'a str>,
        /// Only spends with this merchant category code.
        pub mcc: Option<&'a str>,
        /// Every agent's spends, not only the requesting agent's.
        pub wallet_wide: bool,
        /// Only spends made under this mandate.
        pub mandate_id: Option<&'a str>,
    }

    /// A past spend, as far as a query reads it.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Spend<'a> {
        pub currency: &'a str,
        pub at_ms: u64,
        pub merchant_id: &'a str,
        pub mcc: &'a str,
        /// The agent that made it: `None` for the requesting agent.
        pub agent_id: Option<&'a str>,
        /// The mandate it was made under, if any.
        pub mandate_id: Option<&'a str>,
    }

    impl Query<'_> {
        /// Whether `spend` counts: in the query's currency, at or after
        /// `since_ms`, at the merchant and with the category asked for (if
        /// any), under the mandate asked for (if any), and made by the
        /// requesting agent unless the query is wallet-wide.
        pub fn counts(&self, spend: &Spend<'_>) -> bool {
            let by_this_agent = spend.agent_id.is_none_or(|a| a == self.agent_id);
            spend.currency == self.currency
                && spend.at_ms >= self.since_ms
                && self.merchant_id.is_none_or(|m| m == spend.merchant_id)
                && self.mcc.is_none_or(|m| m == spend.mcc)
                && self.mandate_id.is_none_or(|m| spend.mandate_id == Some(m))
                && (self.wallet_wide || by_this_agent)
        }
    }
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

    #[test]
    fn a_query_counts_what_it_names() {
        let query = history::Query {
            currency: "USD",
            agent_id: "ag_1",
            since_ms: 100,
            merchant_id: None,
            mcc: None,
            wallet_wide: false,
            mandate_id: None,
        };
        let spend = history::Spend {
            currency: "USD",
            at_ms: 100,
            merchant_id: "m",
            mcc: "5734",
            agent_id: None,
            mandate_id: None,
        };
        assert!(query.counts(&spend));
        assert!(query.counts(&history::Spend { agent_id: Some("ag_1"), ..spend }));
        assert!(!query.counts(&history::Spend { currency: "EUR", ..spend }));
        assert!(!query.counts(&history::Spend { at_ms: 99, ..spend }));
        assert!(!query.counts(&history::Spend { agent_id: Some("ag_2"), ..spend }));
        let wide = history::Query { wallet_wide: true, ..query };
        assert!(wide.counts(&history::Spend { agent_id: Some("ag_2"), ..spend }));
        assert!(!history::Query { merchant_id: Some("n"), ..query }.counts(&spend));
        assert!(history::Query { merchant_id: Some("m"), ..query }.counts(&spend));
        assert!(!history::Query { mcc: Some("5812"), ..query }.counts(&spend));
        let mandate = history::Query { mandate_id: Some("md_1"), ..query };
        assert!(!mandate.counts(&spend));
        assert!(mandate.counts(&history::Spend { mandate_id: Some("md_1"), ..spend }));
        assert!(!mandate.counts(&history::Spend { mandate_id: Some("md_2"), ..spend }));
    }
}
