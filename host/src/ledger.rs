//! The wallet ledger's vocabulary, in the spirit of TigerBeetle: accounts and
//! transfers only, integer amounts, debits equal credits, two-phase holds.
//!
//! Per currency there are four accounts. A balance is credits minus debits.
//!
//! | transfer | debit     | credit    | when |
//! | -------- | --------- | --------- | ---- |
//! | deposit  | funding   | available | the operator funds the wallet |
//! | hold     | available | held      | a card is issued: its cap is reserved |
//! | capture  | held      | spent     | the card is charged: the charged amount |
//! | release  | held      | available | the rest of a charged card's cap, or all of a voided or expired one |
//!
//! `funding` is the outside world and goes negative as money comes in, so the
//! accounts of a currency always sum to zero, and
//! available + held + spent = deposits.

use serde::Serialize;

use crate::money::format_units;

/// The four accounts of a currency.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccountKind {
    Funding,
    Available,
    Held,
    Spent,
}

impl AccountKind {
    pub const ALL: [AccountKind; 4] =
        [AccountKind::Funding, AccountKind::Available, AccountKind::Held, AccountKind::Spent];

    pub fn as_str(self) -> &'static str {
        match self {
            AccountKind::Funding => "funding",
            AccountKind::Available => "available",
            AccountKind::Held => "held",
            AccountKind::Spent => "spent",
        }
    }
}

/// What a transfer does (see the table above).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransferKind {
    Deposit,
    Hold,
    Capture,
    Release,
}

impl TransferKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TransferKind::Deposit => "deposit",
            TransferKind::Hold => "hold",
            TransferKind::Capture => "capture",
            TransferKind::Release => "release",
        }
    }

    /// The accounts it debits and credits.
    pub fn accounts(self) -> (AccountKind, AccountKind) {
        match self {
            TransferKind::Deposit => (AccountKind::Funding, AccountKind::Available),
            TransferKind::Hold => (AccountKind::Available, AccountKind::Held),
            TransferKind::Capture => (AccountKind::Held, AccountKind::Spent),
            TransferKind::Release => (AccountKind::Held, AccountKind::Available),
        }
    }
}

/// A currency's balances, in units of its smallest denomination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Balance {
    pub currency: String,
    pub exponent: u8,
    pub available: i64,
    pub held: i64,
    pub spent: i64,
}

impl Serialize for Balance {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("Balance", 4)?;
        st.serialize_field("currency", &self.currency)?;
        st.serialize_field("available", &format_units(self.available, self.exponent))?;
        st.serialize_field("held", &format_units(self.held, self.exponent))?;
        st.serialize_field("spent", &format_units(self.spent, self.exponent))?;
        st.end()
    }
}
