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
    fn summarize(
        &self,
        scope: &HistoryScope,
        filter: &SpendFilter,
    ) -> Result<SpendSummary, HistoryError>;
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
}

/// A history given as a list, for `policy eval` and `policy test`.
#[derive(Debug, Clone, Default)]
pub struct StaticHistory(pub Vec<PastSpend>);

impl History for StaticHistory {
    fn summarize(
        &self,
        scope: &HistoryScope,
        filter: &SpendFilter,
    ) -> Result<SpendSummary, HistoryError> {
        let mut total: i64 = 0;
        let mut count: u32 = 0;
        for spend in &self.0 {
            let by_this_agent = spend.agent.as_ref().is_none_or(|a| *a == scope.agent_id);
            let matches = spend.amount.currency() == scope.currency
                && spend.at_ms >= filter.since_ms
                && filter
                    .merchant_id
                    .as_ref()
                    .is_none_or(|m| *m == spend.merchant_id)
                && filter.mcc.as_ref().is_none_or(|m| *m == spend.mcc)
                && (filter.wallet_wide || by_this_agent);
            if matches {
                total = total
                    .checked_add(spend.amount.units())
                    .ok_or_else(|| HistoryError("history total overflows".into()))?;
                count = count.saturating_add(1);
            }
        }
        Ok(SpendSummary {
            total_units: total,
            count,
        })
    }
}
