//! Why a storage operation failed, and the typed conflicts with the
//! wallet's state, each with a stable code the API answers with.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StorageError {
    #[error("idempotency key `{0}` was used with other parameters")]
    IdempotencyConflict(String),
    #[error("{0} not found")]
    NotFound(String),
    /// The acting agent was revoked: nothing it asked for is done.
    #[error("{0}")]
    Revoked(String),
    /// What was asked does not fit the wallet's state now (the message says
    /// why, the [`Conflict`] which case): nothing is done.
    #[error("{1}")]
    Conflict(Conflict, String),
    #[error("card issuer: {0}")]
    Issuer(String),
    #[error("database: {0}")]
    Database(String),
    /// The wallet would be left without an operator token that works.
    #[error("token `{0}` is the last operator token not revoked; make another before revoking it")]
    LastOperatorToken(String),
    /// An invariant of the ledger would break: the transaction is rolled back.
    #[error("ledger invariant: {0}")]
    Invariant(String),
}

/// Which conflict with the wallet's state refused an operation. Each has a
/// stable code, the API's error code (status `409`); the list is also in
/// docs/contract/api.md, "Errors".
///
/// | code | meaning |
/// | --- | --- |
/// | `not_pending_approval` | the spend or mandate is not waiting for the operator's answer: it was approved, denied or revoked already |
/// | `approval_expired` | the spend waited longer than `approval_ttl_seconds`; it is denied |
/// | `already_resolved` | the spend's approval was answered by another request first |
/// | `policies_deny` | on the operator's approval the policies ran again and now deny the spend |
/// | `mandate_refused` | on the operator's approval the spend no longer fits its mandate (spent, ended, out of scope) |
/// | `insufficient_funds` | the wallet's available money does not cover the hold |
/// | `hold_already_resolved` | the hold was captured, voided or expired by another request first |
/// | `card_not_open` | the card was already used, voided or expired |
/// | `already_revoked` | the token or agent is revoked already |
/// | `already_exists` | an agent with this id exists |
/// | `agent_revoked` | the agent named, or the agent of the spend or mandate, is revoked |
/// | `mandate_ended` | the mandate was already revoked, denied or expired |
/// | `mandate_answered` | the mandate was approved or denied by another request first |
/// | `time_out_of_range` | a time beyond what the wallet can store |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Conflict {
    NotPendingApproval,
    ApprovalExpired,
    AlreadyResolved,
    PoliciesDeny,
    MandateRefused,
    InsufficientFunds,
    HoldAlreadyResolved,
    CardNotOpen,
    AlreadyRevoked,
    AlreadyExists,
    AgentRevoked,
    MandateEnded,
    MandateAnswered,
    TimeOutOfRange,
}

impl Conflict {
    /// Every conflict, in the order of the table above.
    pub const ALL: [Conflict; 14] = [
        Conflict::NotPendingApproval,
        Conflict::ApprovalExpired,
        Conflict::AlreadyResolved,
        Conflict::PoliciesDeny,
        Conflict::MandateRefused,
        Conflict::InsufficientFunds,
        Conflict::HoldAlreadyResolved,
        Conflict::CardNotOpen,
        Conflict::AlreadyRevoked,
        Conflict::AlreadyExists,
        Conflict::AgentRevoked,
        Conflict::MandateEnded,
        Conflict::MandateAnswered,
        Conflict::TimeOutOfRange,
    ];

    /// The stable code: snake_case, part of the API's contract.
    pub fn code(self) -> &'static str {
        match self {
            Conflict::NotPendingApproval => "not_pending_approval",
            Conflict::ApprovalExpired => "approval_expired",
            Conflict::AlreadyResolved => "already_resolved",
            Conflict::PoliciesDeny => "policies_deny",
            Conflict::MandateRefused => "mandate_refused",
            Conflict::InsufficientFunds => "insufficient_funds",
            Conflict::HoldAlreadyResolved => "hold_already_resolved",
            Conflict::CardNotOpen => "card_not_open",
            Conflict::AlreadyRevoked => "already_revoked",
            Conflict::AlreadyExists => "already_exists",
            Conflict::AgentRevoked => "agent_revoked",
            Conflict::MandateEnded => "mandate_ended",
            Conflict::MandateAnswered => "mandate_answered",
            Conflict::TimeOutOfRange => "time_out_of_range",
        }
    }
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn every_conflict_has_its_own_snake_case_code_and_the_message_is_the_display() {
        let codes: HashSet<&str> = Conflict::ALL.iter().map(|c| c.code()).collect();
        assert_eq!(codes.len(), Conflict::ALL.len(), "codes are distinct");
        for conflict in Conflict::ALL {
            let code = conflict.code();
            assert!(code.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'), "{code}");
            assert_eq!(conflict.to_string(), code);
            // Not one of the codes the API answers for other errors.
            assert!(
                !["conflict", "idempotency_conflict", "last_operator_token", "not_found"].contains(&code)
            );
        }
        let e = StorageError::Conflict(Conflict::CardNotOpen, "card `card_1` is already used".into());
        assert_eq!(e.to_string(), "card `card_1` is already used");
    }

    #[test]
    fn the_doc_table_lists_every_code_in_order() {
        let source = include_str!("error.rs");
        let listed: Vec<&str> = source
            .lines()
            .filter_map(|l| l.strip_prefix("/// | `"))
            .filter_map(|l| l.split('`').next())
            .collect();
        let codes: Vec<&str> = Conflict::ALL.iter().map(|c| c.code()).collect();
        assert_eq!(listed, codes);
    }
}
