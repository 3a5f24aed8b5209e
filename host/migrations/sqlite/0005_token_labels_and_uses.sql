-- Tokens get a label (what the operator calls each one; NULL for tokens made
-- before labels existed), and a record of when each was last used.

ALTER TABLE tokens ADD COLUMN label TEXT;

-- Uses of a token, coalesced by the daemon: at most one row per token per
-- flush (a minute), written off the request path. The latest is the token's
-- last use; the primary key is the index that finds it.
CREATE TABLE token_uses (
    token_id   TEXT NOT NULL REFERENCES tokens (id),
    used_at_ms INTEGER NOT NULL,
    PRIMARY KEY (token_id, used_at_ms)
);

CREATE TRIGGER token_uses_append_only_u BEFORE UPDATE ON token_uses BEGIN SELECT RAISE(ABORT, 'append-only'); END;
CREATE TRIGGER token_uses_append_only_d BEFORE DELETE ON token_uses BEGIN SELECT RAISE(ABORT, 'append-only'); END;
