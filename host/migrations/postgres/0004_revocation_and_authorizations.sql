-- Network authorizations carry the network's optional `Idempotency-Key`
-- and a keyed fingerprint of the charge (never its PAN or CVV): a retry
-- with the same key gets the first answer, the same key with another
-- charge is a conflict. Added columns of new rows; no row is rewritten.
ALTER TABLE authorizations ADD COLUMN idempotency_key TEXT;
ALTER TABLE authorizations ADD COLUMN fingerprint TEXT;
CREATE UNIQUE INDEX authorizations_idempotency ON authorizations (idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- A card's wrong-CVV tries, counted on each authorization for the lockout:
-- one small index of the declines that count.
CREATE INDEX authorizations_wrong_cvv ON authorizations (card_id) WHERE decline_code = 'wrong_cvv';
