-- Tokens get a label (what the operator calls each one; NULL for tokens made
-- before labels existed), and a record of when each was last used.
-- (PostgreSQL's types; see migrations/sqlite/0005_token_labels_and_uses.sql.)

ALTER TABLE tokens ADD COLUMN label TEXT;

-- Uses of a token, coalesced by the daemon: at most one row per token per
-- flush (a minute), written off the request path. The latest is the token's
-- last use; the primary key is the index that finds it.
CREATE TABLE token_uses (
    token_id   TEXT NOT NULL REFERENCES tokens (id),
    used_at_ms BIGINT NOT NULL,
    PRIMARY KEY (token_id, used_at_ms)
);

CREATE TRIGGER token_uses_append_only BEFORE UPDATE OR DELETE ON token_uses FOR EACH ROW EXECUTE FUNCTION spendguard_append_only();
CREATE TRIGGER token_uses_no_truncate BEFORE TRUNCATE ON token_uses FOR EACH STATEMENT EXECUTE FUNCTION spendguard_append_only();
