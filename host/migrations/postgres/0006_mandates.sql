-- Mandates: a narrow lane of spend authority for one task.
-- (PostgreSQL's types; see migrations/sqlite/0006_mandates.sql.)
CREATE TABLE mandates (
    id            TEXT PRIMARY KEY,
    agent_id      TEXT NOT NULL REFERENCES agents (id),
    units         BIGINT NOT NULL CHECK (units > 0),
    currency      TEXT NOT NULL,
    purpose       TEXT NOT NULL,
    merchant_ids  TEXT NOT NULL,
    mccs          TEXT NOT NULL,
    max_spends    BIGINT CHECK (max_spends IS NULL OR max_spends > 0),
    expires_at_ms BIGINT NOT NULL,
    created_by    TEXT NOT NULL CHECK (created_by IN ('operator', 'agent')),
    created_at_ms BIGINT NOT NULL
);
CREATE INDEX mandates_agent ON mandates (agent_id, created_at_ms);
CREATE INDEX mandates_expiry ON mandates (expires_at_ms);

CREATE TABLE mandate_answers (
    mandate_id     TEXT PRIMARY KEY REFERENCES mandates (id),
    decision       TEXT NOT NULL CHECK (decision IN ('approved', 'denied', 'expired')),
    answered_at_ms BIGINT NOT NULL
);

CREATE TABLE mandate_ends (
    mandate_id  TEXT PRIMARY KEY REFERENCES mandates (id),
    kind        TEXT NOT NULL CHECK (kind IN ('revoked', 'expired')),
    ended_at_ms BIGINT NOT NULL
);

ALTER TABLE spends ADD COLUMN mandate_id TEXT REFERENCES mandates (id);
CREATE INDEX spends_mandate ON spends (mandate_id) WHERE mandate_id IS NOT NULL;

CREATE TRIGGER mandates_append_only BEFORE UPDATE OR DELETE ON mandates FOR EACH ROW EXECUTE FUNCTION spendguard_append_only();
CREATE TRIGGER mandates_no_truncate BEFORE TRUNCATE ON mandates FOR EACH STATEMENT EXECUTE FUNCTION spendguard_append_only();
CREATE TRIGGER mandate_answers_append_only BEFORE UPDATE OR DELETE ON mandate_answers FOR EACH ROW EXECUTE FUNCTION spendguard_append_only();
CREATE TRIGGER mandate_answers_no_truncate BEFORE TRUNCATE ON mandate_answers FOR EACH STATEMENT EXECUTE FUNCTION spendguard_append_only();
CREATE TRIGGER mandate_ends_append_only BEFORE UPDATE OR DELETE ON mandate_ends FOR EACH ROW EXECUTE FUNCTION spendguard_append_only();
CREATE TRIGGER mandate_ends_no_truncate BEFORE TRUNCATE ON mandate_ends FOR EACH STATEMENT EXECUTE FUNCTION spendguard_append_only();
