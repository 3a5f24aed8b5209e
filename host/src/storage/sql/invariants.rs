//! The ledger's invariants, checked from the tables alone.

use super::ledger::balance;
use super::{Conn, args};
use crate::ledger::AccountKind;

pub(super) fn check_invariants(conn: &dyn Conn) -> Result<(), String> {
    // The first row of a query whose rows are each a finding: (what, count).
    let first = |sql: &str| -> Result<Option<(String, i64)>, String> {
        match conn.row(sql, &[]).map_err(|e| e.to_string())? {
            Some(r) => Ok(Some((r.get(0).map_err(|e| e.to_string())?, r.get(1).map_err(|e| e.to_string())?))),
            None => Ok(None),
        }
    };
    // Every transfer has exactly two entries that cancel out.
    if let Some((transfer, n)) = first(
        "SELECT CAST(transfer_id AS TEXT), COUNT(*) FROM entries GROUP BY transfer_id HAVING COUNT(*) <> 2 OR SUM(delta) <> 0",
    )? {
        return Err(format!("transfer {transfer} has {n} entries that do not cancel out"));
    }
    // The accounts of each currency sum to zero.
    if let Some((currency, sum)) =
        first("SELECT a.currency, CAST(SUM(e.delta) AS BIGINT) FROM entries e JOIN accounts a ON a.id = e.account_id
               GROUP BY a.currency HAVING SUM(e.delta) <> 0")?
    {
        return Err(format!("{currency} accounts sum to {sum}, not zero"));
    }
    // Each account's running balance is the sum of its entries so far.
    if let Some((account, bad)) = first(
        "SELECT CAST(account_id AS TEXT), COUNT(*) FROM (
             SELECT account_id, balance_after,
                    SUM(delta) OVER (PARTITION BY account_id ORDER BY id) AS running
             FROM entries) AS running_balances
         WHERE balance_after <> running GROUP BY account_id",
    )? {
        return Err(format!("account {account} has {bad} entries with a wrong running balance"));
    }
    let currencies = conn.rows("SELECT DISTINCT currency FROM accounts", &[]).map_err(|e| e.to_string())?;
    for row in currencies {
        let currency: String = row.get(0).map_err(|e| e.to_string())?;
        let bal = |kind| balance(conn, &currency, kind).map_err(|e| e.to_string());
        let (available, held, spent, funding) = (
            bal(AccountKind::Available)?,
            bal(AccountKind::Held)?,
            bal(AccountKind::Spent)?,
            bal(AccountKind::Funding)?,
        );
        let one = |sql: &str| -> Result<i64, String> {
            conn.one(sql, args![&currency]).and_then(|r| r.get(0)).map_err(|e| e.to_string())
        };
        let deposits = one(
            "SELECT CAST(COALESCE(SUM(units), 0) AS BIGINT) FROM transfers WHERE kind = 'deposit' AND currency = ?1",
        )?;
        if available < 0 || held < 0 || spent < 0 {
            return Err(format!("{currency}: a balance is negative ({available}/{held}/{spent})"));
        }
        if available + held + spent != deposits || -funding != deposits {
            return Err(format!(
                "{currency}: available {available} + held {held} + spent {spent} != deposits {deposits}"
            ));
        }
        let open = one(
            "SELECT CAST(COALESCE(SUM(h.units), 0) AS BIGINT) FROM holds h LEFT JOIN hold_resolutions r ON r.hold_id = h.id
             WHERE r.hold_id IS NULL AND h.currency = ?1",
        )?;
        if open != held {
            return Err(format!("{currency}: held {held} but open holds add up to {open}"));
        }
        let captured = one(
            "SELECT CAST(COALESCE(SUM(r.captured_units), 0) AS BIGINT) FROM hold_resolutions r JOIN holds h ON h.id = r.hold_id
             WHERE h.currency = ?1",
        )?;
        if captured != spent {
            return Err(format!("{currency}: spent {spent} but captures add up to {captured}"));
        }
    }
    // Each hold: one hold transfer, and once resolved, transfers that move
    // exactly its amount out of `held`.
    if let Some((hold, n)) = first(
        "SELECT CAST(h.id AS TEXT), COUNT(t.id) FROM holds h LEFT JOIN transfers t ON t.hold_id = h.id AND t.kind = 'hold'
         GROUP BY h.id HAVING COUNT(t.id) <> 1",
    )? {
        return Err(format!("hold {hold} has {n} hold transfers"));
    }
    if let Some((hold, _)) = first(
        "SELECT CAST(h.id AS TEXT), 0 FROM holds h JOIN hold_resolutions r ON r.hold_id = h.id
         WHERE h.units <> (SELECT COALESCE(SUM(t.units), 0) FROM transfers t WHERE t.hold_id = h.id AND t.kind IN ('capture', 'release'))
            OR r.captured_units > h.units",
    )? {
        return Err(format!("hold {hold} was resolved with the wrong amounts"));
    }
    if let Some((hold, _)) = first(
        "SELECT CAST(h.id AS TEXT), 0 FROM holds h LEFT JOIN hold_resolutions r ON r.hold_id = h.id
         WHERE r.hold_id IS NULL AND EXISTS (SELECT 1 FROM transfers t WHERE t.hold_id = h.id AND t.kind <> 'hold')",
    )? {
        return Err(format!("open hold {hold} has money moved out of it"));
    }
    // A hold without a card only while an approved-after-escalation spend
    // waits for its agent to collect the card.
    if let Some((hold, _)) = first(
        "SELECT CAST(h.id AS TEXT), 0 FROM holds h LEFT JOIN cards c ON c.hold_id = h.id
         LEFT JOIN approval_resolutions a ON a.spend_id = h.spend_id
         WHERE c.id IS NULL AND (a.decision IS NULL OR a.decision <> 'approved')",
    )? {
        return Err(format!("hold {hold} has no card and no approval"));
    }
    // Cards and holds go together, and only approved spends have them.
    if let Some((card, _)) = first(
        "SELECT c.id, 0 FROM cards c LEFT JOIN holds h ON h.id = c.hold_id WHERE h.id IS NULL OR h.spend_id <> c.spend_id OR h.units <> c.cap_units",
    )? {
        return Err(format!("card {card} has no matching hold"));
    }
    if let Some((spend, _)) = first(
        "SELECT s.id, 0 FROM spends s LEFT JOIN holds h ON h.spend_id = s.id
         LEFT JOIN approval_resolutions a ON a.spend_id = s.id
         WHERE (s.status = 'approved' OR COALESCE(a.decision, '') = 'approved') <> (h.id IS NOT NULL)",
    )? {
        return Err(format!("spend {spend}: approved if and only if it holds money, which is not the case"));
    }
    Ok(())
}
