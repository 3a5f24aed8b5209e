//! Questions about past spending, answered by the host.
//!
//! The host counts *committed* spend: captured charges plus the holds of
//! cards still open, in the request's currency only (other currencies are not
//! converted and not counted). What a policy reads here and the commit of its
//! decision are atomic, so concurrent proposals cannot both slip under a limit.

use crate::Money;

/// Which committed spend to add up. Build one with [`SpendFilter::since_ms`]
/// and narrow it with the other methods.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpendFilter {
    /// Only spends received at or after this instant (ms since the epoch).
    pub since_ms: u64,
    /// Only at this merchant id, when set.
    pub merchant_id: Option<String>,
    /// Only with this merchant category code, when set.
    pub mcc: Option<String>,
    /// Every agent of the wallet, not only the requesting one.
    pub wallet_wide: bool,
    /// Only spends made under this mandate, when set.
    pub mandate_id: Option<String>,
}

impl SpendFilter {
    /// This agent's spends received at or after `since_ms`.
    pub fn since_ms(since_ms: u64) -> Self {
        SpendFilter { since_ms, merchant_id: None, mcc: None, wallet_wide: false, mandate_id: None }
    }

    /// Only spends at this merchant id.
    pub fn merchant(mut self, merchant_id: impl Into<String>) -> Self {
        self.merchant_id = Some(merchant_id.into());
        self
    }

    /// Only spends with this merchant category code.
    pub fn mcc(mut self, mcc: impl Into<String>) -> Self {
        self.mcc = Some(mcc.into());
        self
    }

    /// Count every agent of the wallet, not only the requesting one.
    pub fn wallet_wide(mut self) -> Self {
        self.wallet_wide = true;
        self
    }

    /// Only spends made under this mandate (for instance
    /// `request.mandate().map(|m| m.id.clone())`).
    pub fn mandate(mut self, mandate_id: impl Into<String>) -> Self {
        self.mandate_id = Some(mandate_id.into());
        self
    }
}

/// The committed spend a filter matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpendSummary {
    /// In the request's currency.
    pub total: Money,
    /// How many spends were added up.
    pub count: u32,
}

/// Add up committed spend matching `filter`.
///
/// The host caps how many queries one evaluation may make (32 by default);
/// going over it ends the evaluation with a deny, so ask once per question.
/// In native unit tests this reads the fake history of [`crate::testing`].
pub fn summarize(filter: &SpendFilter) -> SpendSummary {
    #[cfg(target_arch = "wasm32")]
    {
        use crate::bindings::{spendguard::policy::history, wit};
        let summary = history::summarize(&wit::SpendFilter {
            since_ms: filter.since_ms,
            merchant_id: filter.merchant_id.clone(),
            mcc: filter.mcc.clone(),
            wallet_wide: filter.wallet_wide,
            mandate_id: filter.mandate_id.clone(),
        });
        // INVARIANT: the host sends totals at the currency's exponent (at
        // most 8 decimals). Should that ever break, the panic traps and the
        // spend is denied, naming this message: failing closed.
        #[allow(clippy::panic)]
        let total = Money::try_from(summary.total)
            .unwrap_or_else(|e| panic!("the host sent an unreadable history total: {e}"));
        SpendSummary { total, count: summary.count }
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        crate::testing::summarize(filter)
    }
}
