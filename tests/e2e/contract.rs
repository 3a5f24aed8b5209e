//! Policy contract versions side by side: a module built straight from the
//! frozen `wit/v0.1.0` folder decides exactly as a 0.1.0 policy always did,
//! policies built with the SDK (contract 0.2.0) see the mandate and narrow an
//! escalation's card, and one daemon runs both.

use std::sync::{Arc, Mutex};

use serde_json::{Value, json};
use spendguard::cases::RequestDoc;
use spendguard::history::{History, HistoryError, HistoryScope, PastSpend, StaticHistory};
use spendguard::money::Amount;
use spendguard::policy::{CardTerms, Decision, SpendFilter, SpendRequest, SpendSummary};
use spendguard::sandbox::{Limits, LoadedPolicy, LogLevel, LogLine, Sandbox};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::support::{Wallet, guests};

/// When the requests here are received (the cases files' default).
const RECEIVED_MS: u64 = 1_795_521_600_000;
const DAY_MS: u64 = 24 * 3_600_000;

/// A fixed history that also records what it was asked.
struct Recording {
    spends: StaticHistory,
    asked: Mutex<Vec<SpendFilter>>,
}

impl Recording {
    fn new(spends: Vec<PastSpend>) -> Arc<Recording> {
        Arc::new(Recording { spends: StaticHistory(spends), asked: Mutex::new(Vec::new()) })
    }

    fn asked(&self) -> Vec<SpendFilter> {
        std::mem::take(&mut *self.asked.lock().unwrap())
    }
}

impl History for Recording {
    fn summarize(&self, scope: &HistoryScope, filter: &SpendFilter) -> Result<SpendSummary, HistoryError> {
        self.asked.lock().unwrap().push(filter.clone());
        self.spends.summarize(scope, filter)
    }
}

fn usd(amount: &str) -> Amount {
    Amount::parse(amount, "USD").unwrap()
}

fn past(amount: &str, merchant: &str, hours_ago: u64, mandate: Option<&str>) -> PastSpend {
    PastSpend {
        amount: usd(amount),
        merchant_id: merchant.into(),
        mcc: "5734".into(),
        at_ms: RECEIVED_MS - hours_ago * 3_600_000,
        agent: None,
        mandate_id: mandate.map(Into::into),
    }
}

/// A request as a cases file writes it, with a mandate object when given.
fn request(amount: &str, merchant: &str, mandate: Option<Value>) -> SpendRequest {
    let mut doc = json!({
        "amount": amount, "currency": "USD",
        "merchant": { "id": merchant, "mcc": "5734" },
        "purpose": "API credits"
    });
    if let Some(m) = mandate {
        doc["mandate"] = m;
    }
    serde_json::from_value::<RequestDoc>(doc).unwrap().to_request().unwrap()
}

fn load(sandbox: &Sandbox, package: &str, world: &str) -> LoadedPolicy {
    let policy = sandbox.load(&guests::bytes(package)).unwrap_or_else(|e| panic!("{package}: {e}"));
    assert_eq!(policy.world(), world, "{package}");
    let version = world.rsplit_once('@').unwrap().1;
    assert!(!policy.imports().is_empty(), "{package} imports the world's interfaces");
    for import in policy.imports() {
        assert!(import.ends_with(&format!("@{version}")), "{package} imports {import}");
    }
    policy
}

/// The module built from `wit/v0.1.0` with wit-bindgen alone: every decision
/// kind, its reasons, its card terms, its history queries and its log lines
/// are what a 0.1.0 policy got before 0.2.0 existed. A mandate on the request
/// changes nothing for it (0.1.0 has no such field), and its escalations get
/// the host's default terms.
#[test]
fn a_guest_built_from_the_frozen_0_1_0_contract_decides_as_before() {
    let sandbox = Sandbox::new(Limits::default()).unwrap();
    let old = load(&sandbox, "guest-v0-1-rules", "spendguard:policy@0.1.0");
    let history = Recording::new(vec![
        past("120.00", "shop.example", 2, None),
        past("9.00", "api.openai.com", 30, None),
    ]);
    let day_at = |merchant: &str| SpendFilter {
        since_ms: RECEIVED_MS - DAY_MS,
        merchant_id: Some(merchant.into()),
        mcc: None,
        wallet_wide: false,
        mandate_id: None,
    };
    let mandate = json!({ "id": "mdt_1", "budget": "500.00", "created_by": "operator" });

    for with_mandate in [false, true] {
        let req =
            |amount: &str, merchant: &str| request(amount, merchant, with_mandate.then(|| mandate.clone()));
        let eval = |r: &SpendRequest| sandbox.evaluate(&old, r, "{}", history.clone() as Arc<dyn History>);

        let allowed = req("10.00", "api.openai.com");
        let run = eval(&allowed);
        assert_eq!(
            run.outcome,
            Ok(Decision::Allow(CardTerms { ttl_seconds: Some(120), max_amount: Some(usd("10.00")) })),
            "mandate: {with_mandate}"
        );
        assert_eq!(history.asked(), [day_at("api.openai.com")]);
        assert_eq!(
            run.logs,
            [LogLine { level: LogLevel::Info, message: "0.1.0 rules on spend-test".into() }]
        );
        assert_eq!(run.history_calls, 1);

        let run = eval(&req("40.00", "shop.example"));
        assert_eq!(
            run.outcome,
            Ok(Decision::Deny(
                "12000 units already spent at shop.example today (1 spends): this one would pass 150 USD"
                    .into()
            ))
        );
        assert_eq!(history.asked(), [day_at("shop.example")]);

        let run = eval(&req("100.01", "api.openai.com"));
        assert_eq!(
            run.outcome,
            Ok(Decision::RequireApproval {
                reason: "10001 units of USD is above 100 USD".into(),
                terms: CardTerms::default()
            })
        );
        assert_eq!(history.asked(), [], "an escalation before any history query");

        let run = eval(&req("1.00", "blocked.example"));
        assert_eq!(run.outcome, Ok(Decision::Deny("merchant blocked.example is blocked".into())));
    }
    let refused = sandbox.validate_config(&old, r#"{"refuse": true}"#);
    assert_eq!(refused.outcome, Ok(Err("this config asks to be refused".into())));
    assert_eq!(sandbox.validate_config(&old, "{}").outcome, Ok(Ok(())));
}

/// A 0.2.0 policy sees every field of the mandate, asks the history of the
/// spends under it, and narrows the card its escalation leads to.
#[test]
fn a_0_2_0_guest_sees_the_mandate_and_narrows_an_escalated_card() {
    let sandbox = Sandbox::new(Limits::default()).unwrap();
    let probe = load(&sandbox, "guest-mandate-probe", "spendguard:policy@0.2.0");
    let history = Recording::new(vec![
        past("180.00", "shop.example", 3, Some("mdt_1")),
        past("5.00", "shop.example", 2, None),
        past("7.00", "shop.example", 1, Some("mdt_2")),
    ]);
    let mandate = json!({
        "id": "mdt_1", "purpose": "conference tickets", "budget": "500.00", "remaining": "320.00",
        "max_spends": 3, "spend_count": 1, "expires_at": "2026-11-24T13:00:00Z", "created_by": "agent"
    });
    let run =
        sandbox.evaluate(&probe, &request("50.00", "shop.example", Some(mandate)), "{}", history.clone());
    assert_eq!(
        run.outcome,
        Ok(Decision::RequireApproval {
            reason:
                "mandate mdt_1 (conference tickets): budget 500.00 USD, remaining 320.00 USD, max spends \
                     Some(3), spend count 1, expires at 1795525200000 ms, created by the operator: false; \
                     history under it: 180.00 USD in 1 spends"
                    .into(),
            terms: CardTerms { ttl_seconds: Some(60), max_amount: Some(usd("320.00")) },
        })
    );
    let asked = history.asked();
    assert_eq!(asked.len(), 1);
    assert_eq!(asked[0].mandate_id.as_deref(), Some("mdt_1"));
    let run = sandbox.evaluate(&probe, &request("50.00", "shop.example", None), "{}", history.clone());
    assert_eq!(run.outcome, Ok(Decision::Allow(CardTerms::default())), "no mandate, nothing to probe");

    // The example policy: inside an operator's mandate no approval is asked;
    // an escalation's card lives as its config says.
    let threshold = load(&sandbox, "approval-threshold", "spendguard:policy@0.2.0");
    let config = r#"{"threshold": "100.00", "currency": "USD", "approved_card_ttl_seconds": 300}"#;
    let decide = |mandate: Option<Value>| {
        let history: Arc<dyn History> = Arc::new(StaticHistory::default());
        sandbox.evaluate(&threshold, &request("150.00", "shop.example", mandate), config, history).outcome
    };
    let escalated = Ok(Decision::RequireApproval {
        reason: "150.00 USD is above the approval threshold of 100.00 USD".into(),
        terms: CardTerms { ttl_seconds: Some(300), max_amount: None },
    });
    assert_eq!(decide(None), escalated);
    assert_eq!(
        decide(Some(json!({"id": "mdt_1", "budget": "200.00", "created_by": "operator"}))),
        Ok(Decision::Allow(CardTerms::default()))
    );
    assert_eq!(decide(Some(json!({"id": "mdt_1", "budget": "200.00", "created_by": "agent"}))), escalated);
    assert_eq!(
        decide(Some(json!({"id": "mdt_1", "budget": "200.00", "remaining": "149.99"}))),
        escalated,
        "more than what is left of the mandate"
    );
}

fn seconds_until(rfc3339: &Value) -> i64 {
    let at = OffsetDateTime::parse(rfc3339.as_str().unwrap(), &Rfc3339).unwrap();
    (at - OffsetDateTime::now_utc()).whole_seconds()
}

/// One daemon, one 0.1.0 module and one 0.2.0 module: both decide; a 0.1.0
/// escalation's card gets the host's default life (15 minutes), a 0.2.0
/// escalation narrows it, and the audit trail shows the escalation's terms.
#[test]
fn one_daemon_runs_a_0_1_0_and_a_0_2_0_policy_side_by_side() {
    let w = Wallet::new();
    w.deposit("1000.00");
    w.upload("old-rules", "guest-v0-1-rules");
    w.upload("approval-threshold", "approval-threshold");
    let old = w.create_agent("old", json!([{"policy": "old-rules", "config": {}}]));
    let both = w.create_agent(
        "both",
        json!([
            {"policy": "old-rules", "config": {}},
            {"policy": "approval-threshold",
             "config": {"threshold": "100.00", "currency": "USD", "approved_card_ttl_seconds": 300}},
        ]),
    );

    // Allowed by the 0.1.0 module: its terms (120 s, capped at the amount).
    let spend = w.propose(&old, "10.00", "api.openai.com", "5734").expect(201, "propose 10.00");
    assert_eq!(spend["status"], "approved", "{spend}");
    let life = seconds_until(&spend["card"]["expires_at"]);
    assert!((100..=120).contains(&life), "a 0.1.0 policy's 120 s card lives {life} s: {spend}");

    // Escalated by the 0.1.0 module alone, then approved: the default life.
    let collect = |agent: &crate::support::AgentToken, id: &Value| {
        let id = id.as_str().unwrap();
        w.post(&format!("/v1/approvals/{id}/approve"), &w.operator, json!({})).expect(200, "approve");
        let got = w.get(&format!("/v1/spends/{id}"), &agent.token).expect(200, "collect the card");
        assert_eq!(got["status"], "approved", "{got}");
        assert!(got["card"]["pan"].is_string(), "the card's secrets, shown once: {got}");
        got
    };
    let spend = w.propose(&old, "150.00", "api.openai.com", "5734").expect(201, "propose 150.00");
    assert_eq!(spend["status"], "pending_approval", "{spend}");
    let got = collect(&old, &spend["id"]);
    let life = seconds_until(&got["card"]["expires_at"]);
    assert!(
        (850..=900).contains(&life),
        "a 0.1.0 escalation's card gets the default 900 s, lives {life} s: {got}"
    );

    // Escalated by both: the card of the approval lives as the 0.2.0 policy said.
    let spend = w.propose(&both, "150.00", "shop.example", "5734").expect(201, "propose 150.00");
    assert_eq!(spend["status"], "pending_approval", "{spend}");
    let reasons = spend["reasons"].to_string();
    assert!(reasons.contains("old-rules: 15000 units of USD is above 100 USD"), "{reasons}");
    assert!(reasons.contains("approval-threshold: 150.00 USD is above the approval threshold"), "{reasons}");
    let got = collect(&both, &spend["id"]);
    let life = seconds_until(&got["card"]["expires_at"]);
    assert!((250..=300).contains(&life), "the escalated card lives {life} s, not at most 300 s: {got}");
    assert_eq!(got["card"]["limit"], "150.00", "{got}");

    // The trail records each policy's escalation with its terms.
    let records = w.read("/v1/audit?limit=1000")["records"].as_array().unwrap().clone();
    let proposal = records
        .iter()
        .find(|r| r["kind"] == "spend" && r["record"]["spend_id"] == spend["id"])
        .unwrap_or_else(|| panic!("no audit record of {}", spend["id"]));
    let policies = proposal["record"]["policies"].as_array().unwrap();
    let terms_of = |name: &str| {
        let p =
            policies.iter().find(|p| p["policy"] == name).unwrap_or_else(|| panic!("{name}: {policies:?}"));
        assert_eq!(p["decision"], "require_approval", "{p}");
        p["card_terms"].clone()
    };
    assert_eq!(terms_of("approval-threshold"), json!({"ttl_seconds": 300, "max_amount": null}));
    assert_eq!(terms_of("old-rules"), json!({"ttl_seconds": null, "max_amount": null}));
}
