-- The wallet ledger, cards and spends. Append-only: the triggers at the end
-- refuse any UPDATE or DELETE, so a mistake is corrected by a new row, never
-- by rewriting history.

-- One account per currency and kind. Balances are credits minus debits:
-- `funding` (the outside world) goes negative as money is deposited; the
-- sum over every account is zero at all times.
CREATE TABLE accounts (
    id       INTEGER PRIMARY KEY,
    currency TEXT NOT NULL,
    kind     TEXT NOT NULL CHECK (kind IN ('funding', 'available', 'held', 'spent')),
    UNIQUE (currency, kind)
);

-- A movement of money between two accounts of one currency.
CREATE TABLE transfers (
    id             INTEGER PRIMARY KEY,
    kind           TEXT NOT NULL CHECK (kind IN ('deposit', 'hold', 'capture', 'release')),
    currency       TEXT NOT NULL,
    units          INTEGER NOT NULL CHECK (units > 0),
    debit_account  INTEGER NOT NULL REFERENCES accounts (id),
    credit_account INTEGER NOT NULL REFERENCES accounts (id),
    hold_id        INTEGER REFERENCES holds (id),
    created_at_ms  INTEGER NOT NULL,
    CHECK (debit_account <> credit_account)
);
CREATE INDEX transfers_hold ON transfers (hold_id) WHERE hold_id IS NOT NULL;

-- Double entry: every transfer writes one debit and one credit line, each
-- with the account's balance after it, so a balance is one indexed lookup.
CREATE TABLE entries (
    id            INTEGER PRIMARY KEY,
    transfer_id   INTEGER NOT NULL REFERENCES transfers (id),
    account_id    INTEGER NOT NULL REFERENCES accounts (id),
    delta         INTEGER NOT NULL CHECK (delta <> 0),
    balance_after INTEGER NOT NULL
);
CREATE INDEX entries_account ON entries (account_id, id);

-- Deposits into the wallet, with the operator's optional idempotency key.
CREATE TABLE deposits (
    id              TEXT PRIMARY KEY,
    transfer_id     INTEGER NOT NULL UNIQUE REFERENCES transfers (id),
    idempotency_key TEXT UNIQUE,
    created_at_ms   INTEGER NOT NULL
);

-- Every proposal and the decision on it.
CREATE TABLE spends (
    id              TEXT PRIMARY KEY,
    agent_id        TEXT NOT NULL,
    idempotency_key TEXT,
    fingerprint     TEXT NOT NULL,
    units           INTEGER NOT NULL CHECK (units > 0),
    currency        TEXT NOT NULL,
    merchant_id     TEXT NOT NULL,
    merchant_name   TEXT NOT NULL,
    mcc             TEXT NOT NULL,
    country         TEXT NOT NULL,
    purpose         TEXT NOT NULL,
    received_at_ms  INTEGER NOT NULL,
    status          TEXT NOT NULL CHECK (status IN ('approved', 'denied', 'pending_approval')),
    reasons         TEXT NOT NULL,
    -- The narrowest card terms the allowing policies set, kept for a spend
    -- that waits for approval.
    card_ttl_seconds INTEGER,
    card_cap_units   INTEGER,
    created_at_ms   INTEGER NOT NULL
);
CREATE UNIQUE INDEX spends_idempotency ON spends (agent_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- Money reserved for one approved spend. Denormalized (agent, merchant,
-- category, time) so policies' history queries are one indexed range scan.
CREATE TABLE holds (
    id             INTEGER PRIMARY KEY,
    spend_id       TEXT NOT NULL UNIQUE REFERENCES spends (id),
    agent_id       TEXT NOT NULL,
    currency       TEXT NOT NULL,
    units          INTEGER NOT NULL CHECK (units > 0),
    merchant_id    TEXT NOT NULL,
    mcc            TEXT NOT NULL,
    received_at_ms INTEGER NOT NULL,
    -- When the hold lapses if nothing resolved it: its card's end of life.
    expires_at_ms  INTEGER NOT NULL,
    created_at_ms  INTEGER NOT NULL
);
CREATE INDEX holds_agent_time ON holds (agent_id, currency, received_at_ms);
CREATE INDEX holds_expiry ON holds (expires_at_ms);
CREATE INDEX holds_wallet_time ON holds (currency, received_at_ms);

-- How each hold ended. The primary key is the hold: a hold resolves exactly
-- once, whatever races to resolve it.
CREATE TABLE hold_resolutions (
    hold_id        INTEGER PRIMARY KEY REFERENCES holds (id),
    kind           TEXT NOT NULL CHECK (kind IN ('captured', 'voided', 'expired')),
    captured_units INTEGER NOT NULL CHECK (captured_units >= 0),
    resolved_at_ms INTEGER NOT NULL
);

-- Single-use cards. No PAN and no CVV: a keyed hash of each and the last
-- four digits.
CREATE TABLE cards (
    id            TEXT PRIMARY KEY,
    hold_id       INTEGER NOT NULL UNIQUE REFERENCES holds (id),
    spend_id      TEXT NOT NULL UNIQUE REFERENCES spends (id),
    agent_id      TEXT NOT NULL,
    issuer        TEXT NOT NULL,
    pan_hash      TEXT NOT NULL UNIQUE,
    cvv_hash      TEXT NOT NULL,
    last4         TEXT NOT NULL,
    exp_month     INTEGER NOT NULL,
    exp_year      INTEGER NOT NULL,
    cap_units     INTEGER NOT NULL CHECK (cap_units > 0),
    currency      TEXT NOT NULL,
    merchant_id   TEXT NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    created_at_ms INTEGER NOT NULL
);
CREATE INDEX cards_agent ON cards (agent_id, created_at_ms);

-- Every authorization attempt, approved or not (never the PAN or CVV).
CREATE TABLE authorizations (
    id            INTEGER PRIMARY KEY,
    card_id       TEXT REFERENCES cards (id),
    units         INTEGER NOT NULL,
    currency      TEXT NOT NULL,
    merchant_id   TEXT NOT NULL,
    approved      INTEGER NOT NULL CHECK (approved IN (0, 1)),
    decline_code  TEXT,
    created_at_ms INTEGER NOT NULL
);

-- How far expiry sweeps have got: every hold that lapsed at or before
-- `swept_to_ms` has been released, so the next sweep looks only at holds
-- lapsing after it (less an overlap for clocks that disagree).
CREATE TABLE expiry_sweeps (
    id          INTEGER PRIMARY KEY,
    swept_to_ms INTEGER NOT NULL
);

CREATE TRIGGER accounts_append_only_u BEFORE UPDATE ON accounts BEGIN SELECT RAISE(ABORT, 'accounts are append-only'); END;
CREATE TRIGGER accounts_append_only_d BEFORE DELETE ON accounts BEGIN SELECT RAISE(ABORT, 'accounts are append-only'); END;
CREATE TRIGGER transfers_append_only_u BEFORE UPDATE ON transfers BEGIN SELECT RAISE(ABORT, 'transfers are append-only'); END;
CREATE TRIGGER transfers_append_only_d BEFORE DELETE ON transfers BEGIN SELECT RAISE(ABORT, 'transfers are append-only'); END;
CREATE TRIGGER entries_append_only_u BEFORE UPDATE ON entries BEGIN SELECT RAISE(ABORT, 'entries are append-only'); END;
CREATE TRIGGER entries_append_only_d BEFORE DELETE ON entries BEGIN SELECT RAISE(ABORT, 'entries are append-only'); END;
CREATE TRIGGER deposits_append_only_u BEFORE UPDATE ON deposits BEGIN SELECT RAISE(ABORT, 'deposits are append-only'); END;
CREATE TRIGGER deposits_append_only_d BEFORE DELETE ON deposits BEGIN SELECT RAISE(ABORT, 'deposits are append-only'); END;
CREATE TRIGGER spends_append_only_u BEFORE UPDATE ON spends BEGIN SELECT RAISE(ABORT, 'spends are append-only'); END;
CREATE TRIGGER spends_append_only_d BEFORE DELETE ON spends BEGIN SELECT RAISE(ABORT, 'spends are append-only'); END;
CREATE TRIGGER holds_append_only_u BEFORE UPDATE ON holds BEGIN SELECT RAISE(ABORT, 'holds are append-only'); END;
CREATE TRIGGER holds_append_only_d BEFORE DELETE ON holds BEGIN SELECT RAISE(ABORT, 'holds are append-only'); END;
CREATE TRIGGER hold_resolutions_append_only_u BEFORE UPDATE ON hold_resolutions BEGIN SELECT RAISE(ABORT, 'hold resolutions are append-only'); END;
CREATE TRIGGER hold_resolutions_append_only_d BEFORE DELETE ON hold_resolutions BEGIN SELECT RAISE(ABORT, 'hold resolutions are append-only'); END;
CREATE TRIGGER cards_append_only_u BEFORE UPDATE ON cards BEGIN SELECT RAISE(ABORT, 'cards are append-only'); END;
CREATE TRIGGER cards_append_only_d BEFORE DELETE ON cards BEGIN SELECT RAISE(ABORT, 'cards are append-only'); END;
CREATE TRIGGER authorizations_append_only_u BEFORE UPDATE ON authorizations BEGIN SELECT RAISE(ABORT, 'authorizations are append-only'); END;
CREATE TRIGGER authorizations_append_only_d BEFORE DELETE ON authorizations BEGIN SELECT RAISE(ABORT, 'authorizations are append-only'); END;
CREATE TRIGGER expiry_sweeps_append_only_u BEFORE UPDATE ON expiry_sweeps BEGIN SELECT RAISE(ABORT, 'expiry sweeps are append-only'); END;
CREATE TRIGGER expiry_sweeps_append_only_d BEFORE DELETE ON expiry_sweeps BEGIN SELECT RAISE(ABORT, 'expiry sweeps are append-only'); END;
