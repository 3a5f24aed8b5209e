//! The double-entry ledger: accounts per currency, balances, transfers with
//! their two entries, and holds placed and resolved exactly once.

use super::{Conn, args, resolve_once};
use crate::ledger::{AccountKind, TransferKind};
use crate::money::Amount;
use crate::policy::Merchant;
use crate::storage::{Conflict, StorageError};

pub(super) fn account_id(
    conn: &dyn Conn,
    currency: &str,
    kind: AccountKind,
) -> Result<Option<i64>, StorageError> {
    conn.row("SELECT id FROM accounts WHERE currency = ?1 AND kind = ?2", args![currency, kind.as_str()])?
        .map(|r| r.get(0))
        .transpose()
}

pub(super) fn ensure_accounts(conn: &dyn Conn, currency: &str) -> Result<(), StorageError> {
    for kind in AccountKind::ALL {
        conn.execute(
            "INSERT INTO accounts (currency, kind) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
            args![currency, kind.as_str()],
        )?;
    }
    Ok(())
}

pub(crate) const BALANCE_SQL: &str =
    "SELECT balance_after FROM entries WHERE account_id = ?1 ORDER BY id DESC LIMIT 1";

pub(super) fn balance_of(conn: &dyn Conn, account: i64) -> Result<i64, StorageError> {
    conn.row(BALANCE_SQL, args![account])?.map_or(Ok(0), |r| r.get(0))
}

pub(super) fn balance(conn: &dyn Conn, currency: &str, kind: AccountKind) -> Result<i64, StorageError> {
    match account_id(conn, currency, kind)? {
        Some(id) => balance_of(conn, id),
        None => Ok(0),
    }
}

/// Post one transfer: a transfer row and its two entries. Refuses to take
/// any account but `funding` below zero.
pub(super) fn transfer(
    conn: &dyn Conn,
    kind: TransferKind,
    currency: &str,
    units: i64,
    hold_id: Option<i64>,
    now_ms: i64,
) -> Result<i64, StorageError> {
    let (debit_kind, credit_kind) = kind.accounts();
    let missing = || StorageError::Invariant(format!("no {currency} accounts"));
    let debit = account_id(conn, currency, debit_kind)?.ok_or_else(missing)?;
    let credit = account_id(conn, currency, credit_kind)?.ok_or_else(missing)?;
    let overflow = || StorageError::Invariant("balance overflow".into());
    let debit_after = balance_of(conn, debit)?.checked_sub(units).ok_or_else(overflow)?;
    let credit_after = balance_of(conn, credit)?.checked_add(units).ok_or_else(overflow)?;
    if debit_kind != AccountKind::Funding && debit_after < 0 {
        return Err(StorageError::Invariant(format!(
            "{} {currency} would go below zero",
            debit_kind.as_str()
        )));
    }
    let transfer_id: i64 = conn
        .one(
            "INSERT INTO transfers (kind, currency, units, debit_account, credit_account, hold_id, created_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) RETURNING id",
            args![kind.as_str(), currency, units, debit, credit, hold_id, now_ms],
        )?
        .get(0)?;
    conn.execute(
        "INSERT INTO entries (transfer_id, account_id, delta, balance_after) VALUES (?1, ?2, ?3, ?4), (?1, ?5, ?6, ?7)",
        args![transfer_id, debit, -units, debit_after, credit, units, credit_after],
    )?;
    Ok(transfer_id)
}

/// Resolve a hold exactly once: the primary key of `hold_resolutions` makes
/// a second resolution fail, whatever raced.
pub(super) fn resolve_hold(
    conn: &dyn Conn,
    hold_id: i64,
    kind: &str,
    currency: &str,
    cap_units: i64,
    captured_units: i64,
    now_ms: i64,
) -> Result<(), StorageError> {
    resolve_once(
        conn,
        "INSERT INTO hold_resolutions (hold_id, kind, captured_units, resolved_at_ms) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT DO NOTHING",
        args![hold_id, kind, captured_units, now_ms],
        Conflict::HoldAlreadyResolved,
        || format!("hold {hold_id} is already resolved"),
    )?;
    if captured_units > 0 {
        transfer(conn, TransferKind::Capture, currency, captured_units, Some(hold_id), now_ms)?;
    }
    let rest = cap_units - captured_units;
    if rest > 0 {
        transfer(conn, TransferKind::Release, currency, rest, Some(hold_id), now_ms)?;
    }
    Ok(())
}

/// Reserve `cap` for a spend: a hold row and the transfer into `held`.
#[allow(clippy::too_many_arguments)] // one column each
pub(super) fn place_hold(
    conn: &dyn Conn,
    spend_id: &str,
    agent_id: &str,
    cap: &Amount,
    merchant: &Merchant,
    received_at_ms: i64,
    expires_at_ms: i64,
    now: i64,
) -> Result<i64, StorageError> {
    let hold_id: i64 = conn
        .one(
            "INSERT INTO holds (spend_id, agent_id, currency, units, merchant_id, mcc, received_at_ms, expires_at_ms,
                                created_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) RETURNING id",
            args![
                spend_id,
                agent_id,
                cap.currency(),
                cap.units(),
                &merchant.id,
                &merchant.mcc,
                received_at_ms,
                expires_at_ms,
                now
            ],
        )?
        .get(0)?;
    transfer(conn, TransferKind::Hold, cap.currency(), cap.units(), Some(hold_id), now)?;
    Ok(hold_id)
}
