-- The history query (a policy's "what was spent in this window") reads
-- every hold of the window. With the amount, merchant and category in the
-- index it reads them from the index alone instead of looking each hold
-- up in its table: one b-tree walk per hold fewer.
DROP INDEX holds_agent_time;
CREATE INDEX holds_agent_time ON holds (agent_id, currency, received_at_ms, units, merchant_id, mcc);
DROP INDEX holds_wallet_time;
CREATE INDEX holds_wallet_time ON holds (currency, received_at_ms, units, merchant_id, mcc);
