#!/usr/bin/env bash
# `make run`: a demo wallet on 127.0.0.1:7420 — a data directory with a funded
# wallet, the example policies and an agent that has them attached — then the
# daemon in the foreground, with the tokens and copy-paste examples printed.
#
# Tokens are stored only as hashes, so on a second run the demo mints fresh
# ones with `spendguard token new --data-dir` (which needs the data
# directory's files, not the daemon), labelled `demo`, and then revokes the
# tokens earlier runs printed: only the ones printed last keep working.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=target/release/spendguard
WASM=target/wasm32-unknown-unknown/release
DATA=${SPENDGUARD_DATA_DIR:-spendguard-data}
LISTEN=${SPENDGUARD_LISTEN:-127.0.0.1:7420}
URL="http://$LISTEN"
json() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }

fresh=0
if [ ! -d "$DATA" ]; then
  tokens=$("$BIN" init --data-dir "$DATA" --json)
  OPERATOR=$(echo "$tokens" | json "['operator_token']")
  NETWORK=$(echo "$tokens" | json "['network_token']")
  fresh=1
else
  minted=$("$BIN" token new --data-dir "$DATA" --role operator --label demo --json)
  OPERATOR=$(echo "$minted" | json "['token']")
  KEEP=$(echo "$minted" | json "['id']")
  minted=$("$BIN" token new --data-dir "$DATA" --role network --label demo --json)
  NETWORK=$(echo "$minted" | json "['token']")
  KEEP="$KEEP $(echo "$minted" | json "['id']")"
fi

"$BIN" serve --data-dir "$DATA" --listen "$LISTEN" > "$DATA/serve.out" 2> "$DATA/serve.log" &
daemon=$!
trap 'kill -TERM $daemon 2>/dev/null; wait $daemon 2>/dev/null' EXIT INT TERM
for _ in $(seq 100); do
  curl -fs "$URL/healthz" > /dev/null 2>&1 && break
  kill -0 $daemon 2>/dev/null || { cat "$DATA/serve.log"; exit 1; }
  sleep 0.1
done

export SPENDGUARD_URL="$URL"
if [ $fresh = 1 ]; then
  SPENDGUARD_TOKEN=$OPERATOR "$BIN" wallet deposit 500.00 USD --idempotency-key demo-funding > /dev/null
  for p in spend-limit merchant-rules approval-threshold purchase-cap; do
    SPENDGUARD_TOKEN=$OPERATOR "$BIN" policy upload "$WASM/${p//-/_}.wasm" --name "$p" > /dev/null
  done
  cfg=$(mktemp -d)
  echo '{"limit": "100.00", "currency": "USD", "window": "24h"}' > "$cfg/limit.json"
  echo '{"block_mcc": ["7995"]}' > "$cfg/merchants.json"
  echo '{"threshold": "50.00", "currency": "USD"}' > "$cfg/approval.json"
  echo '{"cap": "200.00", "currency": "USD", "ttl_seconds": 600}' > "$cfg/cap.json"
  agent=$(SPENDGUARD_TOKEN=$OPERATOR "$BIN" agent create demo-agent --json --label team=demo \
    --policy spend-limit --config "$cfg/limit.json" \
    --policy merchant-rules --config "$cfg/merchants.json" \
    --policy approval-threshold --config "$cfg/approval.json" \
    --policy purchase-cap --config "$cfg/cap.json")
  rm -r "$cfg"
  AGENT_ID=$(echo "$agent" | json "['id']")
  AGENT=$(echo "$agent" | json "['token']")
  echo "$AGENT_ID" > "$DATA/demo-agent-id"
else
  AGENT_ID=$(cat "$DATA/demo-agent-id")
  minted=$("$BIN" token new --data-dir "$DATA" --role agent --agent "$AGENT_ID" --label demo --json)
  AGENT=$(echo "$minted" | json "['token']")
  KEEP="$KEEP $(echo "$minted" | json "['id']")"
  # The tokens of earlier runs (made by `init`, by creating the demo agent,
  # or minted here) are revoked: they were printed, and nothing uses them.
  SPENDGUARD_TOKEN=$OPERATOR "$BIN" token list --json | DEMO_AGENT="$AGENT_ID" python3 -c '
import json, os, sys
keep = set(sys.argv[1:])
for t in json.load(sys.stdin)["tokens"]:
    ours = t["role"] != "agent" or t.get("agent_id") == os.environ["DEMO_AGENT"]
    if ours and t["revoked_at"] is None and t["id"] not in keep and t["label"] in ("init", "demo", "demo-agent"):
        print(t["id"])' $KEEP | while read -r id; do
    SPENDGUARD_TOKEN=$OPERATOR "$BIN" token revoke "$id" > /dev/null
  done
fi

cat <<TXT

spendguard is running on $URL (data in $DATA/, logs in $DATA/serve.log).
The demo wallet holds USD; the agent demo-agent ($AGENT_ID) has four policies:
a 100.00 USD daily limit, gambling (MCC 7995) blocked, approval above 50.00 USD,
and cards capped at 200.00 USD living 10 minutes.

  operator token: $OPERATOR
  agent token:    $AGENT
  network token:  $NETWORK

Propose a spend as the agent (curl):

  curl -s -X POST $URL/v1/spends -H "Authorization: Bearer $AGENT" \\
    -H 'Content-Type: application/json' \\
    -d '{"amount": "12.50", "currency": "USD", "merchant": {"id": "api.openai.com", "name": "OpenAI", "mcc": "5734", "country": "US"}, "purpose": "API credits"}'

or with the CLI:

  SPENDGUARD_URL=$URL SPENDGUARD_TOKEN=$AGENT $BIN spend propose \\
    --amount 12.50 --currency USD --merchant-id api.openai.com --merchant-name OpenAI --mcc 5734 --purpose "API credits"

Charge the card it returns, as the merchant's network would (put in its pan, cvv and expiry):

  curl -s -X POST $URL/v1/network/authorizations -H "Authorization: Bearer $NETWORK" \\
    -H 'Content-Type: application/json' \\
    -d '{"pan": "PAN", "cvv": "CVV", "exp_month": MM, "exp_year": YYYY, "amount": "12.50", "currency": "USD", "merchant_id": "api.openai.com"}'

  SPENDGUARD_URL=$URL SPENDGUARD_TOKEN=$NETWORK $BIN network authorize \\
    --pan PAN --cvv CVV --exp-month MM --exp-year YYYY --amount 12.50 --currency USD --merchant-id api.openai.com

See the wallet, cards and the audit trail as the operator:

  export SPENDGUARD_URL=$URL SPENDGUARD_TOKEN=$OPERATOR
  $BIN wallet show; $BIN card list; $BIN approval list; $BIN audit verify

Ctrl-C stops the daemon (it finishes requests in flight).
TXT
wait $daemon
