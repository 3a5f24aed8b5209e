//! Who may do what: every route of the API called by every kind of caller
//! (none, a malformed or unknown token, a revoked agent, the network, another
//! agent, the agent, the operator), and what each gets.

use std::collections::BTreeSet;

use serde_json::json;

use crate::support::{Body, Wallet, bearer, guests, ids, proposal};

/// Who calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    Nobody,
    /// The operator's own token, but not as `Bearer`.
    Malformed,
    Unknown,
    RevokedAgent,
    Network,
    OtherAgent,
    Agent,
    Operator,
}

const CALLERS: [Who; 8] = [
    Who::Nobody,
    Who::Malformed,
    Who::Unknown,
    Who::RevokedAgent,
    Who::Network,
    Who::OtherAgent,
    Who::Agent,
    Who::Operator,
];

/// One route of the API (docs/contract/api.md), and who gets what from it (every other caller with a
/// valid token gets 403).
struct Route {
    method: &'static str,
    path: String,
    body: Body,
    allowed: Vec<(Who, u16)>,
}

fn route(method: &'static str, path: impl Into<String>, body: Body, allowed: &[(Who, u16)]) -> Route {
    Route { method, path: path.into(), body, allowed: allowed.to_vec() }
}

#[test]
fn authority_matrix() {
    let w = Wallet::new();
    w.deposit("1000.00");
    w.upload("approval-threshold", "approval-threshold");
    let threshold =
        json!([{"policy": "approval-threshold", "config": {"threshold": "50.00", "currency": "USD"}}]);
    let alpha = w.create_agent("alpha", threshold.clone());
    let beta = w.create_agent("beta", threshold.clone());
    let revoked = w.create_agent("revoked", json!([]));
    let doomed = w.create_agent("to be revoked", json!([]));
    let r = w.post(&format!("/v1/agents/{}/revoke", revoked.id), &w.operator, json!({}));
    assert_eq!(r.expect(200, "revoke")["revoked"], true);

    let spend = w.propose(&alpha, "10.00", "api.openai.com", "5734").expect(201, "alpha proposes");
    assert_eq!(spend["status"], "approved", "{spend}");
    let (spend_id, card_id) = (spend["id"].as_str().unwrap(), spend["card"]["id"].as_str().unwrap());
    let beta_spend = w.propose(&beta, "10.00", "api.openai.com", "5734").expect(201, "beta proposes");
    let beta_card = beta_spend["card"]["id"].as_str().unwrap();
    let pending = |what| {
        let p = w.propose(&alpha, "60.00", "api.openai.com", "5734").expect(201, what);
        assert_eq!(p["status"], "pending_approval", "{p}");
        p["id"].as_str().unwrap().to_owned()
    };
    let (to_approve, to_deny) = (pending("to approve"), pending("to deny"));
    w.assert_wallet("980.00", "20.00", "0.00");
    let spare = w.post("/v1/tokens", &w.operator, json!({"role": "network", "label": "spare"}));
    let spare = spare.expect(201, "a spare token")["id"].as_str().unwrap().to_owned();
    let lane = json!({"amount": "5.00", "currency": "USD", "purpose": "a lane"});
    let ask = |what| {
        let m = w.post("/v1/mandates", &alpha.token, lane.clone()).expect(201, what);
        assert_eq!(m["status"], "pending_approval", "{m}");
        m["id"].as_str().unwrap().to_owned()
    };
    let (lane_to_approve, lane_to_deny, lane) =
        (ask("a lane to approve"), ask("a lane to deny"), ask("a lane"));

    use Who::{Agent, Network, Operator, OtherAgent};
    let operator_only = |ok: u16| vec![(Operator, ok)];
    let module = guests::bytes("approval-threshold");
    let charge = json!({"pan": "4000000000000002", "cvv": "123", "exp_month": 12, "exp_year": 2030,
                        "amount": "1.00", "currency": "USD", "merchant_id": "api.openai.com"});
    let routes = [
        route(
            "POST",
            "/v1/spends",
            Body::Json(proposal("10.00", "api.openai.com", "5734")),
            &[(Agent, 201), (OtherAgent, 201)],
        ),
        route(
            "GET",
            format!("/v1/spends/{spend_id}"),
            Body::None,
            &[(Agent, 200), (OtherAgent, 404), (Operator, 200)],
        ),
        route("GET", "/v1/spends", Body::None, &[(Agent, 200), (OtherAgent, 200), (Operator, 200)]),
        route(
            "POST",
            "/v1/spends/preview",
            Body::Json(proposal("10.00", "api.openai.com", "5734")),
            &[(Agent, 200), (OtherAgent, 200)],
        ),
        // An agent asks for its own mandate; the operator must name the agent.
        route(
            "POST",
            "/v1/mandates",
            Body::Json(json!({"amount": "5.00", "currency": "USD", "purpose": "made in the matrix"})),
            &[(Agent, 201), (OtherAgent, 201), (Operator, 422)],
        ),
        route("GET", "/v1/mandates", Body::None, &[(Agent, 200), (OtherAgent, 200), (Operator, 200)]),
        route(
            "GET",
            format!("/v1/mandates/{lane}"),
            Body::None,
            &[(Agent, 200), (OtherAgent, 404), (Operator, 200)],
        ),
        route("POST", format!("/v1/mandates/{lane_to_approve}/approve"), Body::None, &operator_only(200)),
        route("POST", format!("/v1/mandates/{lane_to_deny}/deny"), Body::None, &operator_only(200)),
        // Its agent gives it up first; the operator then finds it ended.
        route(
            "POST",
            format!("/v1/mandates/{lane}/revoke"),
            Body::None,
            &[(Agent, 200), (OtherAgent, 404), (Operator, 409)],
        ),
        route(
            "GET",
            "/v1/whoami",
            Body::None,
            &[(Network, 200), (Agent, 200), (OtherAgent, 200), (Operator, 200)],
        ),
        route("GET", "/v1/approvals", Body::None, &operator_only(200)),
        route("POST", format!("/v1/approvals/{to_approve}/approve"), Body::None, &operator_only(200)),
        route(
            "POST",
            format!("/v1/approvals/{to_deny}/deny"),
            Body::Json(json!({"reason": "no"})),
            &operator_only(200),
        ),
        route(
            "POST",
            "/v1/wallet/deposits",
            Body::Json(json!({"amount": "5.00", "currency": "USD"})),
            &operator_only(201),
        ),
        route("GET", "/v1/wallet", Body::None, &operator_only(200)),
        // Sent as over a slow link, where a refusal from the headers alone
        // reaches the client while it is still sending the module.
        route("POST", "/v1/policies?name=matrix", Body::SlowModule(module), &operator_only(201)),
        route("GET", "/v1/policies", Body::None, &operator_only(200)),
        route("POST", "/v1/agents", Body::Json(json!({"name": "made in the matrix"})), &operator_only(201)),
        route("GET", "/v1/agents", Body::None, &operator_only(200)),
        route("POST", format!("/v1/agents/{}/revoke", doomed.id), Body::None, &operator_only(200)),
        route(
            "PUT",
            format!("/v1/agents/{}/policies", alpha.id),
            Body::Json(json!({"policies": threshold})),
            &operator_only(200),
        ),
        route("GET", "/v1/cards", Body::None, &[(Agent, 200), (OtherAgent, 200), (Operator, 200)]),
        route("POST", format!("/v1/cards/{card_id}/void"), Body::None, &operator_only(200)),
        route("POST", "/v1/network/authorizations", Body::Json(charge), &[(Network, 200)]),
        route("GET", "/v1/audit", Body::None, &operator_only(200)),
        route("GET", "/v1/audit/verify", Body::None, &operator_only(200)),
        route("GET", "/v1/tokens", Body::None, &operator_only(200)),
        route(
            "POST",
            "/v1/tokens",
            Body::Json(json!({"role": "network", "label": "made in the matrix"})),
            &operator_only(201),
        ),
        route("POST", format!("/v1/tokens/{spare}/revoke"), Body::None, &operator_only(200)),
    ];
    let unknown = format!("sg_op_{}", "0".repeat(64));
    let mut wrong = Vec::new();
    for r in &routes {
        for who in CALLERS {
            let authorization = match who {
                Who::Nobody => None,
                Who::Malformed => Some(format!("Basic {}", w.operator)),
                Who::Unknown => Some(bearer(&unknown)),
                Who::RevokedAgent => Some(bearer(&revoked.token)),
                Who::Network => Some(bearer(&w.network)),
                Who::OtherAgent => Some(bearer(&beta.token)),
                Who::Agent => Some(bearer(&alpha.token)),
                Who::Operator => Some(bearer(&w.operator)),
            };
            let allowed = r.allowed.iter().find(|(w, _)| *w == who).map(|(_, s)| *s);
            let (status, code) = match (who, allowed) {
                (Who::Nobody, _) => (401, Some("missing_token")),
                (Who::Malformed | Who::Unknown, _) => (401, Some("invalid_token")),
                (Who::RevokedAgent, _) => (401, Some("revoked_token")),
                (_, Some(404)) => (404, Some("not_found")),
                (_, Some(status)) => (status, None),
                (_, None) => (403, Some("forbidden")),
            };
            // Every cell is checked, so one run shows every wrong one.
            let checked = w
                .try_send(r.method, &r.path, authorization.as_deref(), &[], r.body.clone())
                .and_then(|reply| reply.check(status, code));
            if let Err(e) = checked {
                wrong.push(format!("{} {} by {who:?}: {e}", r.method, r.path));
            }
        }
    }
    for open in ["/healthz", "/metrics"] {
        let reply = w.send("GET", open, None, &[], Body::None);
        assert_eq!(reply.status, 200, "{open} needs no token: {}", reply.text);
    }

    // Only what the operator did with its token happened.
    w.assert_wallet("915.00", "90.00", "0.00");
    let agents = w.read("/v1/agents")["agents"].clone();
    let revoked_ids: BTreeSet<&str> = agents
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["revoked"] == true)
        .map(|a| a["id"].as_str().unwrap())
        .collect();
    assert_eq!(revoked_ids, BTreeSet::from([revoked.id.as_str(), doomed.id.as_str()]));
    assert_eq!(agents.as_array().unwrap().len(), 5);
    // The lanes: alpha's three and one each made in the matrix; the
    // operator answered two and alpha gave one up.
    let lanes = w.read("/v1/mandates")["mandates"].clone();
    let status_of = |id: &str| {
        lanes.as_array().unwrap().iter().find(|m| m["id"] == id).unwrap_or_else(|| panic!("{id}: {lanes}"))
            ["status"]
            .clone()
    };
    assert_eq!(lanes.as_array().unwrap().len(), 5, "{lanes}");
    assert_eq!(
        [status_of(&lane_to_approve), status_of(&lane_to_deny), status_of(&lane)],
        [json!("active"), json!("denied"), json!("revoked")]
    );
    let versions: Vec<_> =
        w.read("/v1/policies")["policies"].as_array().unwrap().iter().map(|p| p["name"].clone()).collect();
    assert_eq!(versions, [json!("approval-threshold"), json!("matrix")]);

    // An agent sees its own spends and cards, never another's.
    let alpha_cards = w.get("/v1/cards", &alpha.token).expect(200, "alpha's cards");
    let alpha_cards = ids(&alpha_cards["cards"]);
    assert!(alpha_cards.contains(&card_id) && !alpha_cards.contains(&beta_card), "{alpha_cards:?}");
    let beta_cards = w.get("/v1/cards", &beta.token).expect(200, "beta's cards");
    let beta_cards = ids(&beta_cards["cards"]);
    assert!(beta_cards.contains(&beta_card) && !beta_cards.contains(&card_id), "{beta_cards:?}");
    for (agent, n) in [(&alpha, 4), (&beta, 2)] {
        let spends = w.get("/v1/spends", &agent.token).expect(200, "an agent's spends");
        let spends = spends["spends"].as_array().unwrap();
        assert_eq!(spends.len(), n, "{spends:?}");
        assert!(spends.iter().all(|s| s["agent_id"] == agent.id.as_str()), "{spends:?}");
    }
    // A revoked agent's token opens nothing, however it is sent.
    let r = w.get(&format!("/v1/spends/{spend_id}"), &doomed.token);
    r.refused(401, "revoked_token", "the revoked agent");

    assert!(wrong.is_empty(), "{} of the matrix wrong:\n{}", wrong.len(), wrong.join("\n"));
}
