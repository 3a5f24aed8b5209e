//! Cards: an expired card releases its hold.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::{Wallet, declined};

#[test]
fn expired_cards_release_their_hold() {
    let w = Wallet::new();
    w.deposit("100.00");
    w.upload("purchase-cap", "purchase-cap");
    let bot = w.create_agent(
        "bot",
        json!([{"policy": "purchase-cap", "config": {"cap": "50.00", "currency": "USD", "ttl_seconds": 1}}]),
    );
    let spend = w.propose(&bot, "5.00", "api.openai.com", "5734").expect(201, "propose");
    assert_eq!(spend["status"], "approved", "{spend}");
    let card = &spend["card"];
    w.assert_wallet("95.00", "5.00", "0.00");
    // The sweeper releases it within a second or so of its expiry.
    let deadline = Instant::now() + Duration::from_secs(10);
    while w.read("/v1/wallet")["balances"][0]["held"] != "0.00" {
        assert!(Instant::now() < deadline, "the hold of an expired card was not released");
        std::thread::sleep(Duration::from_millis(100));
    }
    w.assert_wallet("100.00", "0.00", "0.00");
    assert_eq!(w.charge(card, "5.00", "api.openai.com"), declined("card_expired"));
    w.assert_wallet("100.00", "0.00", "0.00");
    assert_eq!(w.read("/v1/cards")["cards"][0]["state"], "expired");
}
