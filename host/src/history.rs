//! Where policies' history queries are answered. The offline tools answer
//! them from a list (a cases file); the daemon from the ledger.

use crate::money::Amount;
use crate::policy::{SpendFilter, SpendSummary};

/// Whose history a query is about: the requesting agent, in the request's
/// currency.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryScope {
    pub agent_id: String,
    pub currency: String,
}

/// Why a history query could not be answered. The policy's spend is denied.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct HistoryError(pub String);

/// Answers `history.summarize` for one evaluation.
///
/// Only spends in the scope's currency count (amounts are never converted);
/// spends of other agents count only for wallet-wide filters.
pub trait History: Send + Sync {
    fn summarize(&self, scope: &HistoryScope, filter: &SpendFilter) -> Result<SpendSummary, HistoryError>;
}

/// One committed spend in a fixed history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PastSpend {
    pub amount: Amount,
    pub merchant_id: String,
    pub mcc: String,
    pub at_ms: u64,
    /// `None`: the requesting agent. `Some(id)`: another agent of the wallet.
    pub agent: Option<String>,
    /// The mandate it was made under, if any.
    pub mandate_id: Option<String>,
}

/// A history given as a list, for `policy eval` and `policy test`.
#[derive(Debug, Clone, Default)]
pub struct StaticHistory(pub Vec<PastSpend>);

impl PastSpend {
    /// The spend as the history rule reads it.
    pub fn view(&self) -> spendguard_types::history::Spend<'_> {
        spendguard_types::history::Spend {
            currency: self.amount.currency(),
            at_ms: self.at_ms,
            merchant_id: &self.merchant_id,
            mcc: &self.mcc,
            agent_id: self.agent.as_deref(),
            mandate_id: self.mandate_id.as_deref(),
        }
    }
}

/// `filter` asked in `scope`, as the history rule reads it.
pub fn query<'a>(scope: &'a HistoryScope, filter: &'a SpendFilter) -> spendguard_types::history::Query<'a> {
    spendguard_types::history::Query {
        currency: &scope.currency,
        agent_id: &scope.agent_id,
        since_ms: filter.since_ms,
        merchant_id: filter.merchant_id.as_deref(),
        mcc: filter.mcc.as_deref(),
        wallet_wide: filter.wallet_wide,
        mandate_id: filter.mandate_id.as_deref(),
    }
}

impl History for StaticHistory {
    fn summarize(&self, scope: &HistoryScope, filter: &SpendFilter) -> Result<SpendSummary, HistoryError> {
        let mut total: i64 = 0;
        let mut count: u32 = 0;
        for spend in &self.0 {
            if query(scope, filter).counts(&spend.view()) {
                total = total
                    .checked_add(spend.amount.units())
                    .ok_or_else(|| HistoryError("history total overflows".into()))?;
                count = count.saturating_add(1);
            }
        }
        Ok(SpendSummary { total_units: total, count })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spend(
        amount: &str,
        currency: &str,
        merchant: &str,
        mcc: &str,
        at_ms: u64,
        agent: Option<&str>,
    ) -> PastSpend {
        PastSpend {
            amount: Amount::parse(amount, currency).unwrap(),
            merchant_id: merchant.into(),
            mcc: mcc.into(),
            at_ms,
            agent: agent.map(Into::into),
            mandate_id: None,
        }
    }

    #[test]
    fn filters_select_what_the_contract_says() {
        let history = StaticHistory(vec![
            spend("10.00", "USD", "a.com", "5734", 1_000, None),
            spend("0.10", "USD", "b.com", "5815", 2_000, None),
            spend("0.20", "USD", "a.com", "5734", 3_000, Some("test-agent")),
            spend("7.00", "EUR", "a.com", "5734", 3_000, None),
            spend("5.00", "USD", "a.com", "5734", 3_000, Some("other-bot")),
        ]);
        let scope = HistoryScope { agent_id: "test-agent".into(), currency: "USD".into() };
        let filter = |since_ms, merchant: Option<&str>, mcc: Option<&str>, wallet_wide| SpendFilter {
            since_ms,
            merchant_id: merchant.map(Into::into),
            mcc: mcc.map(Into::into),
            wallet_wide,
            mandate_id: None,
        };
        let sum = |f: SpendFilter| {
            let s = history.summarize(&scope, &f).unwrap();
            (s.total_units, s.count)
        };
        // Own spends in USD only; 0.10 + 0.20 is exactly 0.30.
        assert_eq!(sum(filter(2_000, None, None, false)), (30, 2));
        // since_ms is inclusive.
        assert_eq!(sum(filter(1_000, None, None, false)), (1030, 3));
        assert_eq!(sum(filter(1_001, None, None, false)), (30, 2));
        assert_eq!(sum(filter(0, Some("a.com"), None, false)), (1020, 2));
        assert_eq!(sum(filter(0, None, Some("5815"), false)), (10, 1));
        // Other agents count only wallet-wide; EUR never counts for USD.
        assert_eq!(sum(filter(0, None, None, true)), (1530, 4));
    }

    #[test]
    fn a_mandate_filter_counts_only_that_mandates_spends() {
        let in_mandate = |s: PastSpend, id: &str| PastSpend { mandate_id: Some(id.into()), ..s };
        let history = StaticHistory(vec![
            in_mandate(spend("4.00", "USD", "a.com", "5734", 1_000, None), "mdt_1"),
            in_mandate(spend("3.00", "USD", "b.com", "5734", 2_000, None), "mdt_1"),
            in_mandate(spend("2.00", "USD", "a.com", "5734", 2_000, None), "mdt_2"),
            spend("1.00", "USD", "a.com", "5734", 2_000, None),
        ]);
        let scope = HistoryScope { agent_id: "test-agent".into(), currency: "USD".into() };
        let filter = |mandate: Option<&str>, merchant: Option<&str>| SpendFilter {
            since_ms: 0,
            merchant_id: merchant.map(Into::into),
            mcc: None,
            wallet_wide: false,
            mandate_id: mandate.map(Into::into),
        };
        let sum = |f: SpendFilter| {
            let s = history.summarize(&scope, &f).unwrap();
            (s.total_units, s.count)
        };
        assert_eq!(sum(filter(Some("mdt_1"), None)), (700, 2));
        assert_eq!(sum(filter(Some("mdt_1"), Some("a.com"))), (400, 1));
        assert_eq!(sum(filter(Some("mdt_3"), None)), (0, 0));
        assert_eq!(sum(filter(None, None)), (1000, 4));
    }
}
