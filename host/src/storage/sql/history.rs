//! The policies' history in SQL: what an agent (or the wallet) committed to
//! spend in a window, optionally at one merchant or merchant category.

use super::{Arg, Conn, ms};
use crate::history::HistoryScope;
use crate::policy::{SpendFilter, SpendSummary};
use crate::storage::StorageError;

/// Committed spend: captured amounts plus the holds of cards still open.
pub(super) fn summarize(
    conn: &dyn Conn,
    scope: &HistoryScope,
    filter: &SpendFilter,
) -> Result<SpendSummary, StorageError> {
    let since = ms(filter.since_ms)?;
    let (sql, args) = summarize_query(scope, filter, &since);
    let row = conn.one(&sql, &args)?;
    let (total, count): (i64, i64) = (row.get(0)?, row.get(1)?);
    Ok(SpendSummary { total_units: total, count: u32::try_from(count).unwrap_or(u32::MAX) })
}

// The history rule (`spendguard_types::history::Query::counts`, which the
// fixed histories use) written again as SQL: the ledger is summed in the
// database, under the write lock, not read row by row into Rust. The two must
// say the same: currency, `since_ms`, merchant, category, mandate, this agent
// unless wallet-wide.
/// The history query for one filter shape, built so that it is one range
/// scan of `holds_agent_time` (or `holds_wallet_time` when wallet-wide): its
/// cost follows the spends in the window, not the size of the ledger.
pub(crate) fn summarize_query<'a>(
    scope: &'a HistoryScope,
    filter: &'a SpendFilter,
    since: &'a i64,
) -> (String, Vec<Arg<'a>>) {
    let mut sql = String::from(
        "SELECT CAST(COALESCE(SUM(CASE WHEN r.hold_id IS NULL THEN h.units ELSE r.captured_units END), 0) AS BIGINT),
                COUNT(CASE WHEN r.hold_id IS NULL OR r.kind = 'captured' THEN 1 END)
         FROM holds h LEFT JOIN hold_resolutions r ON r.hold_id = h.id
         WHERE h.currency = ?1 AND h.received_at_ms >= ?2",
    );
    let mut args = vec![Arg::Text(&scope.currency), Arg::Int(*since)];
    if !filter.wallet_wide {
        args.push(Arg::Text(&scope.agent_id));
        sql.push_str(&format!(" AND h.agent_id = ?{}", args.len()));
    }
    if let Some(merchant) = &filter.merchant_id {
        args.push(Arg::Text(merchant));
        sql.push_str(&format!(" AND h.merchant_id = ?{}", args.len()));
    }
    if let Some(mcc) = &filter.mcc {
        args.push(Arg::Text(mcc));
        sql.push_str(&format!(" AND h.mcc = ?{}", args.len()));
    }
    // Only the spends made under one mandate: found by `spends_mandate`.
    if let Some(mandate_id) = &filter.mandate_id {
        args.push(Arg::Text(mandate_id));
        sql.push_str(&format!(
            " AND h.spend_id IN (SELECT id FROM spends WHERE mandate_id = ?{})",
            args.len()
        ));
    }
    (sql, args)
}
