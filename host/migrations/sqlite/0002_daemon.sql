-- What the daemon adds to the ledger: who may do what (tokens, agents),
-- which policies run for whom, approvals, and the hash-chained audit trail.
-- Append-only like the ledger: a revocation or a new set of attachments is a
-- new row.

-- Bearer tokens, stored as SHA-256 of the token (tokens are 256-bit random,
-- so a fast hash is enough; the clear token is shown once and never stored).
CREATE TABLE tokens (
    id            TEXT PRIMARY KEY,
    role          TEXT NOT NULL CHECK (role IN ('operator', 'agent', 'network')),
    agent_id      TEXT REFERENCES agents (id),
    hash          TEXT NOT NULL UNIQUE,
    created_at_ms INTEGER NOT NULL,
    CHECK ((role = 'agent') = (agent_id IS NOT NULL))
);
CREATE INDEX tokens_agent ON tokens (agent_id) WHERE agent_id IS NOT NULL;
CREATE TABLE token_revocations (
    token_id      TEXT PRIMARY KEY REFERENCES tokens (id),
    revoked_at_ms INTEGER NOT NULL
);

CREATE TABLE agents (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    labels        TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL
);
CREATE TABLE agent_revocations (
    agent_id      TEXT PRIMARY KEY REFERENCES agents (id),
    revoked_at_ms INTEGER NOT NULL
);

-- Uploaded policy modules. A new upload under a name is its next version.
CREATE TABLE policies (
    name          TEXT NOT NULL,
    version       INTEGER NOT NULL CHECK (version > 0),
    sha256        TEXT NOT NULL,
    module        BLOB NOT NULL,
    created_at_ms INTEGER NOT NULL,
    PRIMARY KEY (name, version)
);

-- Which policies run for an agent. Each PUT writes a new set; the set with
-- the highest number is in force.
CREATE TABLE attachment_sets (
    agent_id      TEXT NOT NULL REFERENCES agents (id),
    set_no        INTEGER NOT NULL,
    created_at_ms INTEGER NOT NULL,
    PRIMARY KEY (agent_id, set_no)
);
CREATE TABLE attachments (
    agent_id       TEXT NOT NULL,
    set_no         INTEGER NOT NULL,
    position       INTEGER NOT NULL,
    policy_name    TEXT NOT NULL,
    policy_version INTEGER NOT NULL,
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
    resolved_at_ms INTEGER NOT NULL
);
CREATE INDEX spends_pending ON spends (status, received_at_ms) WHERE status = 'pending_approval';
CREATE INDEX spends_agent ON spends (agent_id, created_at_ms);

-- The audit trail: each record's hash covers the previous record's hash, so
-- an edited or removed record breaks the chain from there on.
CREATE TABLE audit (
    seq       INTEGER PRIMARY KEY,
    at_ms     INTEGER NOT NULL,
    kind      TEXT NOT NULL,
    record    TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash      TEXT NOT NULL
);

CREATE TRIGGER tokens_append_only_u BEFORE UPDATE ON tokens BEGIN SELECT RAISE(ABORT, 'tokens are append-only'); END;
CREATE TRIGGER tokens_append_only_d BEFORE DELETE ON tokens BEGIN SELECT RAISE(ABORT, 'tokens are append-only'); END;
CREATE TRIGGER token_revocations_append_only_u BEFORE UPDATE ON token_revocations BEGIN SELECT RAISE(ABORT, 'append-only'); END;
CREATE TRIGGER token_revocations_append_only_d BEFORE DELETE ON token_revocations BEGIN SELECT RAISE(ABORT, 'append-only'); END;
CREATE TRIGGER agents_append_only_u BEFORE UPDATE ON agents BEGIN SELECT RAISE(ABORT, 'agents are append-only'); END;
CREATE TRIGGER agents_append_only_d BEFORE DELETE ON agents BEGIN SELECT RAISE(ABORT, 'agents are append-only'); END;
CREATE TRIGGER agent_revocations_append_only_u BEFORE UPDATE ON agent_revocations BEGIN SELECT RAISE(ABORT, 'append-only'); END;
CREATE TRIGGER agent_revocations_append_only_d BEFORE DELETE ON agent_revocations BEGIN SELECT RAISE(ABORT, 'append-only'); END;
CREATE TRIGGER policies_append_only_u BEFORE UPDATE ON policies BEGIN SELECT RAISE(ABORT, 'policies are append-only'); END;
CREATE TRIGGER policies_append_only_d BEFORE DELETE ON policies BEGIN SELECT RAISE(ABORT, 'policies are append-only'); END;
CREATE TRIGGER attachment_sets_append_only_u BEFORE UPDATE ON attachment_sets BEGIN SELECT RAISE(ABORT, 'append-only'); END;
CREATE TRIGGER attachment_sets_append_only_d BEFORE DELETE ON attachment_sets BEGIN SELECT RAISE(ABORT, 'append-only'); END;
CREATE TRIGGER attachments_append_only_u BEFORE UPDATE ON attachments BEGIN SELECT RAISE(ABORT, 'append-only'); END;
CREATE TRIGGER attachments_append_only_d BEFORE DELETE ON attachments BEGIN SELECT RAISE(ABORT, 'append-only'); END;
CREATE TRIGGER approval_resolutions_append_only_u BEFORE UPDATE ON approval_resolutions BEGIN SELECT RAISE(ABORT, 'append-only'); END;
CREATE TRIGGER approval_resolutions_append_only_d BEFORE DELETE ON approval_resolutions BEGIN SELECT RAISE(ABORT, 'append-only'); END;
CREATE TRIGGER audit_append_only_u BEFORE UPDATE ON audit BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
CREATE TRIGGER audit_append_only_d BEFORE DELETE ON audit BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
