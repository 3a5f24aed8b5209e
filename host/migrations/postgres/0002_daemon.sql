-- What the daemon adds to the ledger: who may do what (tokens, agents),
-- which policies run for whom, approvals, and the hash-chained audit trail.
-- Append-only like the ledger: a revocation or a new set of attachments is a
-- new row. (PostgreSQL's types; see migrations/sqlite/0002_daemon.sql.)

-- Bearer tokens, stored as SHA-256 of the token (tokens are 256-bit random,
-- so a fast hash is enough; the clear token is shown once and never stored).
CREATE TABLE tokens (
    id            TEXT PRIMARY KEY,
    role          TEXT NOT NULL CHECK (role IN ('operator', 'agent', 'network')),
    agent_id      TEXT, -- REFERENCES agents (id), added once agents exists
    hash          TEXT NOT NULL UNIQUE,
    created_at_ms BIGINT NOT NULL,
    CHECK ((role = 'agent') = (agent_id IS NOT NULL))
);
CREATE INDEX tokens_agent ON tokens (agent_id) WHERE agent_id IS NOT NULL;
CREATE TABLE token_revocations (
    token_id      TEXT PRIMARY KEY REFERENCES tokens (id),
    revoked_at_ms BIGINT NOT NULL
);

CREATE TABLE agents (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    labels        TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL
);
ALTER TABLE tokens ADD FOREIGN KEY (agent_id) REFERENCES agents (id);

CREATE TABLE agent_revocations (
    agent_id      TEXT PRIMARY KEY REFERENCES agents (id),
    revoked_at_ms BIGINT NOT NULL
);

-- Uploaded policy modules. A new upload under a name is its next version.
CREATE TABLE policies (
    name          TEXT NOT NULL,
    version       BIGINT NOT NULL CHECK (version > 0),
    sha256        TEXT NOT NULL,
    module        BYTEA NOT NULL,
    created_at_ms BIGINT NOT NULL,
    PRIMARY KEY (name, version)
);

-- Which policies run for an agent. Each PUT writes a new set; the set with
-- the highest number is in force.
CREATE TABLE attachment_sets (
    agent_id      TEXT NOT NULL REFERENCES agents (id),
    set_no        BIGINT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    PRIMARY KEY (agent_id, set_no)
);
CREATE TABLE attachments (
    agent_id       TEXT NOT NULL,
    set_no         BIGINT NOT NULL,
    position       BIGINT NOT NULL,
    policy_name    TEXT NOT NULL,
    policy_version BIGINT NOT NULL,
    config         TEXT NOT NULL,
    PRIMARY KEY (agent_id, set_no, position),
    FOREIGN KEY (agent_id, set_no) REFERENCES attachment_sets (agent_id, set_no),
    FOREIGN KEY (policy_name, policy_version) REFERENCES policies (name, version)
);

-- How a spend that waited for approval ended: exactly once.
CREATE TABLE approval_resolutions (
    spend_id       TEXT PRIMARY KEY REFERENCES spends (id),
    decision       TEXT NOT NULL CHECK (decision IN ('approved', 'denied', 'expired')),
    reason         TEXT NOT NULL,
    resolved_at_ms BIGINT NOT NULL
);
CREATE INDEX spends_pending ON spends (status, received_at_ms) WHERE status = 'pending_approval';
CREATE INDEX spends_agent ON spends (agent_id, created_at_ms);

-- The audit trail: each record's hash covers the previous record's hash, so
-- an edited or removed record breaks the chain from there on.
CREATE TABLE audit (
    seq       BIGINT PRIMARY KEY,
    at_ms     BIGINT NOT NULL,
    kind      TEXT NOT NULL,
    record    TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash      TEXT NOT NULL
);

CREATE TRIGGER tokens_append_only BEFORE UPDATE OR DELETE ON tokens FOR EACH ROW EXECUTE FUNCTION spendguard_append_only();
CREATE TRIGGER tokens_no_truncate BEFORE TRUNCATE ON tokens FOR EACH STATEMENT EXECUTE FUNCTION spendguard_append_only();
CREATE TRIGGER token_revocations_append_only BEFORE UPDATE OR DELETE ON token_revocations FOR EACH ROW EXECUTE FUNCTION spendguard_append_only();
CREATE TRIGGER token_revocations_no_truncate BEFORE TRUNCATE ON token_revocations FOR EACH STATEMENT EXECUTE FUNCTION spendguard_append_only();
CREATE TRIGGER agents_append_only BEFORE UPDATE OR DELETE ON agents FOR EACH ROW EXECUTE FUNCTION spendguard_append_only();
CREATE TRIGGER agents_no_truncate BEFORE TRUNCATE ON agents FOR EACH STATEMENT EXECUTE FUNCTION spendguard_append_only();
CREATE TRIGGER agent_revocations_append_only BEFORE UPDATE OR DELETE ON agent_revocations FOR EACH ROW EXECUTE FUNCTION spendguard_append_only();
CREATE TRIGGER agent_revocations_no_truncate BEFORE TRUNCATE ON agent_revocations FOR EACH STATEMENT EXECUTE FUNCTION spendguard_append_only();
CREATE TRIGGER policies_append_only BEFORE UPDATE OR DELETE ON policies FOR EACH ROW EXECUTE FUNCTION spendguard_append_only();
CREATE TRIGGER policies_no_truncate BEFORE TRUNCATE ON policies FOR EACH STATEMENT EXECUTE FUNCTION spendguard_append_only();
CREATE TRIGGER attachment_sets_append_only BEFORE UPDATE OR DELETE ON attachment_sets FOR EACH ROW EXECUTE FUNCTION spendguard_append_only();
CREATE TRIGGER attachment_sets_no_truncate BEFORE TRUNCATE ON attachment_sets FOR EACH STATEMENT EXECUTE FUNCTION spendguard_append_only();
CREATE TRIGGER attachments_append_only BEFORE UPDATE OR DELETE ON attachments FOR EACH ROW EXECUTE FUNCTION spendguard_append_only();
CREATE TRIGGER attachments_no_truncate BEFORE TRUNCATE ON attachments FOR EACH STATEMENT EXECUTE FUNCTION spendguard_append_only();
CREATE TRIGGER approval_resolutions_append_only BEFORE UPDATE OR DELETE ON approval_resolutions FOR EACH ROW EXECUTE FUNCTION spendguard_append_only();
CREATE TRIGGER approval_resolutions_no_truncate BEFORE TRUNCATE ON approval_resolutions FOR EACH STATEMENT EXECUTE FUNCTION spendguard_append_only();
CREATE TRIGGER audit_append_only BEFORE UPDATE OR DELETE ON audit FOR EACH ROW EXECUTE FUNCTION spendguard_append_only();
CREATE TRIGGER audit_no_truncate BEFORE TRUNCATE ON audit FOR EACH STATEMENT EXECUTE FUNCTION spendguard_append_only();
