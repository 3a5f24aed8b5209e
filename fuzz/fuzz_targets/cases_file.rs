//! The documents of `spendguard policy test` and `policy eval` (docs/contract.md, "File formats"),
//! read as the CLI reads them (UTF-8 text, then `serde_json`) and checked by
//! the same library functions: a cases file, a lone request, a history.
//! Nothing may panic; what is accepted meets the documented rules.

#![no_main]

use libfuzzer_sys::fuzz_target;
use spendguard::cases::{self, CasesFile, HistoryEntry, RequestDoc};
use spendguard::history::{History, HistoryScope};
use spendguard::policy::{CardTerms, Decision, SpendFilter};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(file) = serde_json::from_str::<CasesFile>(text) {
        for case in &file.cases {
            // What `policy test` checks before running any case.
            let request = request(&case.request);
            let history = history(&case.history);
            let config = case.config_json();
            assert!(serde_json::from_str::<serde_json::Value>(&config).is_ok(), "{config}");
            if let (Some(request), Some(_)) = (request, history) {
                // The comparison with a decision, as after a run.
                let decisions = [
                    Decision::Allow(CardTerms::default()),
                    Decision::Allow(CardTerms {
                        ttl_seconds: Some(60),
                        max_amount: Some(request.amount.clone()),
                    }),
                    Decision::Deny("over the limit".into()),
                    Decision::RequireApproval { reason: "needs a person".into(), terms: CardTerms::default() },
                ];
                for decision in &decisions {
                    let _ = case.expect.check(decision, &request);
                }
            }
        }
    }
    if let Ok(doc) = serde_json::from_str::<RequestDoc>(text) {
        request(&doc);
    }
    if let Ok(entries) = serde_json::from_str::<Vec<HistoryEntry>>(text) {
        history(&entries);
    }
});

fn request(doc: &RequestDoc) -> Option<spendguard::policy::SpendRequest> {
    let request = doc.to_request().ok()?;
    assert!(request.amount.units() > 0);
    assert!(!request.merchant.id.is_empty());
    assert!(cases::check_mcc("mcc", &request.merchant.mcc).is_ok());
    assert!(cases::check_country("country", &request.merchant.country).is_ok());
    Some(request)
}

/// A history that converts is one every query can add up (or refuse, never
/// panic).
fn history(entries: &[HistoryEntry]) -> Option<()> {
    let history = cases::to_history(entries).ok()?;
    assert_eq!(history.0.len(), entries.len());
    for spend in &history.0 {
        assert!(spend.amount.units() > 0);
        let scope = HistoryScope { agent_id: "self".into(), currency: spend.amount.currency().into() };
        for (since_ms, wallet_wide) in [(0, true), (spend.at_ms, false)] {
            let filter = SpendFilter { since_ms, merchant_id: None, mcc: None, wallet_wide, mandate_id: None };
            if let Ok(summary) = history.summarize(&scope, &filter) {
                assert!(summary.total_units >= spend.amount.units() || !wallet_wide);
                assert!(summary.count >= 1 || !wallet_wide);
            }
        }
    }
    Some(())
}
