-- Mandates: a narrow lane of spend authority for one task (a budget, a
-- currency, merchants and categories, a count, an end). Append-only like
-- everything else: how a request was answered and how a mandate ended are
-- rows of their own, each written at most once (their primary keys). What a
-- mandate has spent, holds and has left is never stored: it is computed from
-- the ledger (the holds of its spends and how they resolved).
CREATE TABLE mandates (
    id            TEXT PRIMARY KEY,
    agent_id      TEXT NOT NULL REFERENCES agents (id),
    units         INTEGER NOT NULL CHECK (units > 0),
    currency      TEXT NOT NULL,
    purpose       TEXT NOT NULL,
    -- JSON arrays of strings; empty: any.
    merchant_ids  TEXT NOT NULL,
    mccs          TEXT NOT NULL,
    max_spends    INTEGER CHECK (max_spends IS NULL OR max_spends > 0),
    expires_at_ms INTEGER NOT NULL,
    created_by    TEXT NOT NULL CHECK (created_by IN ('operator', 'agent')),
    created_at_ms INTEGER NOT NULL
);
CREATE INDEX mandates_agent ON mandates (agent_id, created_at_ms);
CREATE INDEX mandates_expiry ON mandates (expires_at_ms);

-- The operator's answer to a mandate an agent asked for: exactly once.
CREATE TABLE mandate_answers (
    mandate_id     TEXT PRIMARY KEY REFERENCES mandates (id),
    decision       TEXT NOT NULL CHECK (decision IN ('approved', 'denied', 'expired')),
    answered_at_ms INTEGER NOT NULL
);

-- How a mandate ended before its time ran out, or that it did: exactly once.
CREATE TABLE mandate_ends (
    mandate_id  TEXT PRIMARY KEY REFERENCES mandates (id),
    kind        TEXT NOT NULL CHECK (kind IN ('revoked', 'expired')),
    ended_at_ms INTEGER NOT NULL
);

-- The mandate a proposal was made under, if any (new rows only: no row is
-- rewritten). The index finds a mandate's spends for its check and history.
ALTER TABLE spends ADD COLUMN mandate_id TEXT REFERENCES mandates (id);
CREATE INDEX spends_mandate ON spends (mandate_id) WHERE mandate_id IS NOT NULL;

CREATE TRIGGER mandates_append_only_u BEFORE UPDATE ON mandates BEGIN SELECT RAISE(ABORT, 'mandates are append-only'); END;
CREATE TRIGGER mandates_append_only_d BEFORE DELETE ON mandates BEGIN SELECT RAISE(ABORT, 'mandates are append-only'); END;
CREATE TRIGGER mandate_answers_append_only_u BEFORE UPDATE ON mandate_answers BEGIN SELECT RAISE(ABORT, 'append-only'); END;
CREATE TRIGGER mandate_answers_append_only_d BEFORE DELETE ON mandate_answers BEGIN SELECT RAISE(ABORT, 'append-only'); END;
CREATE TRIGGER mandate_ends_append_only_u BEFORE UPDATE ON mandate_ends BEGIN SELECT RAISE(ABORT, 'append-only'); END;
CREATE TRIGGER mandate_ends_append_only_d BEFORE DELETE ON mandate_ends BEGIN SELECT RAISE(ABORT, 'append-only'); END;
