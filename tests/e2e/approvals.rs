//! Approvals: an escalated spend is still held to every policy.

use serde_json::{Value, json};

use crate::support::Wallet;

/// An escalated spend is decided by every policy too: approving it must not
/// let an agent pass a spend limit the policies would have held it to.
#[test]
fn approvals_cannot_pass_the_spend_limit() {
    let w = Wallet::new();
    w.deposit("500.00");
    w.upload("spend-limit", "spend-limit");
    w.upload("approval-threshold", "approval-threshold");
    let bot = w.create_agent(
        "bot",
        json!([
            {"policy": "spend-limit", "config": {"limit": "80.00", "currency": "USD", "window": "24h"}},
            {"policy": "approval-threshold", "config": {"threshold": "50.00", "currency": "USD"}},
        ]),
    );
    let first = w.propose(&bot, "60.00", "api.openai.com", "5734").expect(201, "first 60.00");
    assert_eq!(first["status"], "pending_approval", "{first}");
    let second = w.propose(&bot, "60.00", "api.openai.com", "5734").expect(201, "second 60.00");
    // Either the first counts against the limit while it waits (the second
    // is denied now), or approving the second is refused: never 120.00.
    let approve = |id: &Value| {
        w.post(&format!("/v1/approvals/{}/approve", id.as_str().unwrap()), &w.operator, json!({}))
    };
    approve(&first["id"]).expect(200, "approve the first");
    let second_approval = (second["status"] == "pending_approval").then(|| approve(&second["id"]));
    let wallet = w.read("/v1/wallet");
    assert_eq!(
        wallet,
        json!({"balances": [{"currency": "USD", "available": "440.00", "held": "60.00", "spent": "0.00"}]}),
        "an 80.00 limit let 120.00 through: second proposal {second}, its approval {second_approval:?}"
    );
}
