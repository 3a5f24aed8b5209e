//! Agents over the Model Context Protocol: a real MCP client (the official
//! SDK's) drives `spendguard mcp` on stdio and the daemon's `/mcp` over
//! Streamable HTTP, against a real daemon; and `GET /v1/whoami`.

use std::process::Stdio;

use rmcp::model::{CallToolRequestParams, CallToolResult, Tool};
use rmcp::service::RunningService;
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::{RoleClient, ServiceExt as _};
use serde_json::{Value, json};

use crate::support::{self, AgentToken, Body, Kind, Reply, Wallet, bearer, on_each_backend, spendguard};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Over {
    Stdio,
    Http,
}

/// A connected MCP client, with the runtime it runs on (and on stdio, the
/// `spendguard mcp` process it talks to).
struct Mcp {
    client: Option<RunningService<RoleClient, ()>>,
    _child: Option<tokio::process::Child>,
    rt: tokio::runtime::Runtime,
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

impl Mcp {
    fn connect(w: &Wallet, token: &str, over: Over) -> Mcp {
        let rt = runtime();
        let (client, child) = rt.block_on(async {
            match over {
                Over::Http => {
                    let config =
                        StreamableHttpClientTransportConfig::with_uri(format!("{}/mcp", w.daemon.url))
                            .auth_header(token);
                    let transport = StreamableHttpClientTransport::from_config(config);
                    (().serve(transport).await.expect("the MCP client connects over HTTP"), None)
                }
                Over::Stdio => {
                    let mut child = stdio_server(w, Some(token))
                        .stdin(Stdio::piped())
                        .stdout(Stdio::piped())
                        .stderr(Stdio::inherit())
                        .kill_on_drop(true)
                        .spawn()
                        .expect("`spendguard mcp` starts");
                    let out = child.stdout.take().unwrap();
                    let input = child.stdin.take().unwrap();
                    (().serve((out, input)).await.expect("the MCP client connects over stdio"), Some(child))
                }
            }
        });
        Mcp { client: Some(client), _child: child, rt }
    }

    fn tools(&self) -> Vec<Tool> {
        let client = self.client.as_ref().unwrap();
        self.rt.block_on(client.list_all_tools()).expect("tools/list")
    }

    fn call(&self, tool: &str, arguments: Value) -> CallToolResult {
        let Value::Object(arguments) = arguments else { panic!("arguments are an object") };
        let client = self.client.as_ref().unwrap();
        let params = CallToolRequestParams::new(tool.to_owned()).with_arguments(arguments);
        self.rt.block_on(client.call_tool(params)).unwrap_or_else(|e| panic!("tools/call {tool}: {e}"))
    }

    /// A successful call's structured result, after checking its text.
    #[track_caller]
    fn ok(&self, tool: &str, arguments: Value) -> Value {
        let result = self.call(tool, arguments);
        assert_eq!(result.is_error, Some(false), "{tool}: {result:?}");
        let text = texts(&result);
        assert!(!text.is_empty(), "{tool}: a text for the model: {result:?}");
        result.structured_content.unwrap_or_else(|| panic!("{tool}: structuredContent"))
    }

    /// A refused call: a tool error whose text begins with the error code.
    #[track_caller]
    fn refused(&self, tool: &str, arguments: Value, code: &str) -> String {
        let result = self.call(tool, arguments);
        assert_eq!(result.is_error, Some(true), "{tool} is refused: {result:?}");
        let text = texts(&result);
        assert!(text.starts_with(&format!("{code}: ")), "{tool}: `{code}: …` expected, got {text}");
        assert_eq!(result.structured_content.as_ref().map(|v| &v["error"]["code"]), Some(&json!(code)));
        text
    }
}

impl Drop for Mcp {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            let _ = self.rt.block_on(client.cancel());
        }
    }
}

fn texts(result: &CallToolResult) -> String {
    result.content.iter().filter_map(|c| c.as_text().map(|t| t.text.clone())).collect::<Vec<_>>().join("\n")
}

/// `spendguard mcp` for the wallet's daemon, with `token` (or none).
fn stdio_server(w: &Wallet, token: Option<&str>) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::from(spendguard());
    cmd.arg("mcp").env("SPENDGUARD_URL", &w.daemon.url).env_remove("SPENDGUARD_TOKEN");
    if let Some(token) = token {
        cmd.env("SPENDGUARD_TOKEN", token);
    }
    cmd
}

fn spend(amount: &str, merchant: &str, mcc: &str) -> Value {
    json!({
        "amount": amount, "currency": "USD",
        "merchant": {"id": merchant, "name": "A merchant", "mcc": mcc, "country": "US"},
        "purpose": "an MCP test",
    })
}

/// A wallet with 100.00 USD and an agent whose policies block gambling
/// (MCC 7995) and send spends above 50.00 USD to a human.
fn wallet_with_agent(kind: Kind) -> (Wallet, AgentToken) {
    let w = Wallet::on(kind);
    w.deposit("100.00");
    w.upload("merchant-rules", "merchant-rules");
    w.upload("approval-threshold", "approval-threshold");
    let agent = w.create_agent(
        "mcp bot",
        json!([
            {"policy": "merchant-rules", "config": {"block_mcc": ["7995"]}},
            {"policy": "approval-threshold", "config": {"threshold": "50.00", "currency": "USD"}},
        ]),
    );
    (w, agent)
}

fn the_agent_spends_through_mcp(kind: Kind, over: Over) {
    let (w, agent) = wallet_with_agent(kind);
    let mcp = Mcp::connect(&w, &agent.token, over);

    // Exactly the seven tools, with their input schemas.
    let tools = mcp.tools();
    let names: Vec<&str> = tools.iter().map(|t| t.name.as_ref()).collect();
    assert_eq!(
        names,
        [
            "propose_spend",
            "check_spend",
            "get_spend",
            "list_spends",
            "request_mandate",
            "list_mandates",
            "get_mandate"
        ]
    );
    let schema =
        |name: &str| Value::Object((*tools.iter().find(|t| t.name == name).unwrap().input_schema).clone());
    let propose = schema("propose_spend");
    assert_eq!(propose["required"], json!(["amount", "currency", "merchant", "purpose"]), "{propose}");
    for field in ["amount", "currency", "merchant", "purpose", "mandate_id", "idempotency_key"] {
        assert!(propose["properties"].get(field).is_some(), "propose_spend takes `{field}`: {propose}");
    }
    assert_eq!(propose["properties"]["merchant"]["required"], json!(["id", "name", "mcc"]));
    let check = schema("check_spend");
    assert!(check["properties"].get("idempotency_key").is_none(), "{check}");
    assert_eq!(schema("get_spend")["required"], json!(["id"]));
    assert_eq!(schema("request_mandate")["required"], json!(["amount", "currency", "purpose"]));
    let describe = |name: &str| tools.iter().find(|t| t.name == name).unwrap().description.clone().unwrap();
    assert!(describe("propose_spend").contains("shown ONLY in this result"), "{}", describe("propose_spend"));
    assert!(describe("propose_spend").contains("a human must"), "{}", describe("propose_spend"));

    // Allowed: a card, its secrets in this one result.
    let result = mcp.call("propose_spend", spend("10.00", "api.openai.com", "5734"));
    assert_eq!(result.is_error, Some(false), "{result:?}");
    assert!(texts(&result).contains("will not be shown again"), "{}", texts(&result));
    let approved = result.structured_content.unwrap();
    assert_eq!(approved["status"], "approved", "{approved}");
    let card = &approved["card"];
    assert_eq!(card["pan"].as_str().unwrap().len(), 16, "{card}");
    assert_eq!(card["cvv"].as_str().unwrap().len(), 3, "{card}");
    assert_eq!((&card["limit"], &card["merchant_id"]), (&json!("10.00"), &json!("api.openai.com")));
    w.assert_wallet("90.00", "10.00", "0.00");
    // The card works once, at that merchant.
    assert_eq!(w.charge(card, "10.00", "api.openai.com"), support::approved());
    w.assert_wallet("90.00", "0.00", "10.00");
    // Read again: the card without its secrets.
    let again = mcp.ok("get_spend", json!({"id": approved["id"]}));
    assert_eq!(again["status"], "approved");
    assert!(again["card"]["pan"].is_null() && again["card"]["cvv"].is_null(), "shown once: {again}");

    // Denied: the reasons, no card, nothing held.
    let denied = mcp.ok("propose_spend", spend("10.00", "bets.example.com", "7995"));
    assert_eq!(denied["status"], "denied", "{denied}");
    assert!(denied["reasons"].to_string().contains("7995"), "{denied}");
    assert!(denied.get("card").is_none_or(Value::is_null), "{denied}");

    // Pending: a human answers; the card comes with the first read after.
    let pending = mcp.ok("propose_spend", spend("60.00", "api.openai.com", "5734"));
    assert_eq!(pending["status"], "pending_approval", "{pending}");
    let id = pending["id"].as_str().unwrap().to_owned();
    let waiting = mcp.ok("get_spend", json!({"id": id}));
    assert_eq!(waiting["status"], "pending_approval");
    assert!(waiting["card"].is_null(), "{waiting}");
    w.assert_wallet("90.00", "0.00", "10.00");
    w.post(&format!("/v1/approvals/{id}/approve"), &w.operator, json!({})).expect(200, "approve");
    let result = mcp.call("get_spend", json!({"id": id}));
    assert!(texts(&result).contains("will not be shown again"), "{}", texts(&result));
    let collected = result.structured_content.unwrap();
    assert_eq!(collected["status"], "approved", "{collected}");
    assert_eq!(collected["card"]["pan"].as_str().unwrap().len(), 16, "{collected}");
    let once_more = mcp.ok("get_spend", json!({"id": id}));
    assert!(once_more["card"]["pan"].is_null(), "shown once: {once_more}");
    w.assert_wallet("30.00", "60.00", "10.00");

    // Listing, by status.
    let all = mcp.ok("list_spends", json!({}));
    assert_eq!(all["spends"].as_array().unwrap().len(), 3, "{all}");
    let approved_only = mcp.ok("list_spends", json!({"status": "approved", "limit": 1}));
    let listed = approved_only["spends"].as_array().unwrap();
    assert_eq!(listed.len(), 1, "{approved_only}");
    assert_eq!(listed[0]["status"], "approved");
    assert!(!approved_only.to_string().contains("\"pan\""), "no card number in a list");

    // Refused calls are tool errors carrying the API's code and message;
    // none changes anything.
    mcp.refused("get_spend", json!({"id": "sp_unknown"}), "not_found");
    mcp.refused("get_spend", json!({}), "invalid_arguments");
    let mut float = spend("1.00", "api.openai.com", "5734");
    float["amount"] = json!(1.5);
    mcp.refused("propose_spend", float, "invalid_arguments");
    let mut extra = spend("1.00", "api.openai.com", "5734");
    extra["approve"] = json!(true);
    mcp.refused("propose_spend", extra, "invalid_arguments");
    mcp.refused("propose_spend", spend("1.001", "api.openai.com", "5734"), "invalid_amount");
    mcp.refused("propose_spend", spend("1.00", "api.openai\u{200b}.com", "5734"), "invalid_field");
    mcp.refused("list_spends", json!({"limit": 0}), "invalid_arguments");
    // Another agent's spend is not found.
    let other = w.create_agent("other bot", json!([{"policy": "merchant-rules", "config": {}}]));
    let theirs = w.propose(&other, "1.00", "api.openai.com", "5734").expect(201, "the other agent proposes");
    mcp.refused("get_spend", json!({"id": theirs["id"]}), "not_found");
    w.assert_wallet("29.00", "61.00", "10.00");
    assert_eq!(mcp.ok("list_spends", json!({}))["spends"].as_array().unwrap().len(), 3);

    // A lane for one task: the agent asks, a human approves, the agent
    // checks and spends inside it until what is left no longer fits.
    let asked = mcp.ok(
        "request_mandate",
        json!({"amount": "30.00", "currency": "USD", "purpose": "the course books",
               "merchant_ids": ["books.example"], "max_spends": 2, "expires_in_seconds": 600}),
    );
    assert_eq!(asked["status"], "pending_approval", "{asked}");
    let lane = asked["id"].as_str().unwrap().to_owned();
    let books = |amount: &str| {
        let mut p = spend(amount, "books.example", "5942");
        p["mandate_id"] = json!(lane);
        p
    };
    let listed = mcp.ok("list_mandates", json!({}));
    assert_eq!(ids_of(&listed["mandates"]), std::slice::from_ref(&lane), "{listed}");
    let waiting = mcp.ok("get_mandate", json!({"id": lane}));
    assert_eq!((&waiting["status"], &waiting["remaining"]), (&json!("pending_approval"), &json!("30.00")));
    // Waiting, it lets nothing through: previewed, then proposed.
    let early = mcp.ok("check_spend", books("20.00"));
    assert_eq!(early["decision"], "deny", "{early}");
    assert!(early["reasons"].to_string().contains("waits for the operator"), "{early}");
    w.post(&format!("/v1/mandates/{lane}/approve"), &w.operator, json!({})).expect(200, "approve the lane");
    let fits = mcp.ok("check_spend", books("20.00"));
    assert_eq!(fits["decision"], "allow", "{fits}");
    let ttl = fits["card_terms"]["ttl_seconds"].as_u64().unwrap();
    assert!((590..=600).contains(&ttl), "a card no longer than the lane's 600 s: {fits}");
    assert_eq!(fits["card_terms"]["max_amount"], "20.00", "{fits}");
    let bought = mcp.ok("propose_spend", books("20.00"));
    assert_eq!(bought["status"], "approved", "{bought}");
    assert_eq!(bought["card"]["merchant_id"], "books.example", "{bought}");
    let used = mcp.ok("get_mandate", json!({"id": lane}));
    assert_eq!(
        (&used["status"], &used["held"], &used["remaining"]),
        (&json!("active"), &json!("20.00"), &json!("10.00"))
    );
    let over = mcp.ok("check_spend", books("10.01"));
    assert_eq!(over["decision"], "deny", "{over}");
    assert!(over["reasons"].to_string().contains("mandate:"), "{over}");
    let mut elsewhere = books("1.00");
    elsewhere["merchant"]["id"] = json!("elsewhere.example");
    let refused = mcp.ok("propose_spend", elsewhere);
    assert_eq!(refused["status"], "denied", "{refused}");
    assert!(refused["reasons"].to_string().contains("is not one of"), "{refused}");
    // Bad lanes and other agents' lanes are tool errors that change nothing.
    let lane_of = |amount: &str, merchant: &str| json!({"amount": amount, "currency": "USD", "purpose": "p", "merchant_ids": [merchant]});
    mcp.refused("request_mandate", lane_of("0", "books.example"), "invalid_amount");
    mcp.refused("request_mandate", lane_of("-5.00", "books.example"), "invalid_amount");
    mcp.refused("request_mandate", lane_of("5.00", "books\u{200b}.example"), "invalid_field");
    let mut foreign = lane_of("5.00", "books.example");
    foreign["currency"] = json!("XYZ");
    mcp.refused("request_mandate", foreign, "invalid_amount");
    let mut forever = lane_of("5.00", "books.example");
    forever["expires_in_seconds"] = json!(31 * 24 * 3600);
    mcp.refused("request_mandate", forever, "invalid_field");
    mcp.refused("request_mandate", json!({"amount": "5.00", "currency": "USD"}), "invalid_arguments");
    let theirs = w
        .post(
            "/v1/mandates",
            &w.operator,
            json!({"agent_id": other.id, "amount": "5.00", "currency": "USD", "purpose": "theirs"}),
        )
        .expect(201, "a lane for the other agent");
    mcp.refused("get_mandate", json!({"id": theirs["id"]}), "not_found");
    let mut under_theirs = spend("1.00", "api.openai.com", "5734");
    under_theirs["mandate_id"] = theirs["id"].clone();
    mcp.refused("propose_spend", under_theirs.clone(), "not_found");
    mcp.refused("check_spend", under_theirs, "not_found");
    assert_eq!(ids_of(&mcp.ok("list_mandates", json!({}))["mandates"]), std::slice::from_ref(&lane));
    w.assert_wallet("9.00", "81.00", "10.00");

    // A tool that does not exist is a protocol error, not a new power.
    let client = mcp.client.as_ref().unwrap();
    let params = CallToolRequestParams::new("approve_spend").with_arguments(serde_json::Map::new());
    assert!(mcp.rt.block_on(client.call_tool(params)).is_err(), "there is no approve tool");

    // The MCP calls are in the audit trail like any proposal.
    let audit = w.read("/v1/audit?limit=1000");
    assert!(audit.to_string().contains(&id), "the pending spend is in the trail");
}

/// The ids in a JSON list of records, in order.
fn ids_of(list: &Value) -> Vec<String> {
    list.as_array().unwrap().iter().map(|r| r["id"].as_str().unwrap().to_owned()).collect()
}

fn over_stdio(kind: Kind) {
    the_agent_spends_through_mcp(kind, Over::Stdio);
}

fn over_http(kind: Kind) {
    the_agent_spends_through_mcp(kind, Over::Http);
}

on_each_backend!(over_stdio, over_http);

/// `POST /mcp` with an MCP initialize request and `authorization`.
fn post_mcp(w: &Wallet, authorization: Option<&str>) -> Reply {
    let init = json!({
        "jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}
    });
    w.send(
        "POST",
        "/mcp",
        authorization,
        &[("accept", "application/json, text/event-stream")],
        Body::Json(init),
    )
}

#[test]
fn only_an_agent_token_reaches_mcp_over_http() {
    let (w, agent) = wallet_with_agent(Kind::Sqlite);
    post_mcp(&w, Some(&bearer(&w.operator))).refused(403, "forbidden", "the operator token at /mcp");
    post_mcp(&w, Some(&bearer(&w.network))).refused(403, "forbidden", "the network token at /mcp");
    post_mcp(&w, None).refused(401, "missing_token", "no token at /mcp");
    post_mcp(&w, Some("Bearer sg_not_a_token")).refused(401, "invalid_token", "a bad token at /mcp");
    let reply = post_mcp(&w, Some(&bearer(&agent.token)));
    assert_eq!(reply.status, 200, "the agent's token is let in: {}", reply.text);
    // The SDK's client is refused too.
    let rt = runtime();
    for token in [&w.operator, &w.network] {
        let config =
            StreamableHttpClientTransportConfig::with_uri(format!("{}/mcp", w.daemon.url)).auth_header(token);
        let connected =
            rt.block_on(async { ().serve(StreamableHttpClientTransport::from_config(config)).await });
        assert!(connected.is_err(), "an MCP client with a non-agent token cannot connect");
    }
    // A revoked agent's next call is refused.
    let mcp = Mcp::connect(&w, &agent.token, Over::Http);
    mcp.ok("list_spends", json!({}));
    w.post(&format!("/v1/agents/{}/revoke", agent.id), &w.operator, json!({})).expect(200, "revoke");
    let client = mcp.client.as_ref().unwrap();
    let params = CallToolRequestParams::new("list_spends").with_arguments(serde_json::Map::new());
    let after = mcp.rt.block_on(client.call_tool(params));
    assert!(after.is_err() || after.is_ok_and(|r| r.is_error == Some(true)), "a revoked agent is refused");
}

#[test]
fn spendguard_mcp_refuses_to_start_without_an_agent_token() {
    let (w, agent) = wallet_with_agent(Kind::Sqlite);
    let run = |token: Option<&str>, url: &str| {
        let mut cmd = spendguard();
        cmd.arg("mcp").env("SPENDGUARD_URL", url).env_remove("SPENDGUARD_TOKEN").stdin(Stdio::null());
        if let Some(token) = token {
            cmd.env("SPENDGUARD_TOKEN", token);
        }
        let out = cmd.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let url = w.daemon.url.clone();
    for (token, says) in [
        (Some(w.operator.as_str()), "operator"),
        (Some(w.network.as_str()), "network"),
        (None, "SPENDGUARD_TOKEN"),
        (Some("sg_not_a_token"), "invalid_token"),
    ] {
        let (code, stdout, stderr) = run(token, &url);
        assert_eq!(code, Some(2), "exit 2 ({says}): {stderr}");
        assert!(stderr.contains(says), "it says why ({says}): {stderr}");
        assert!(stdout.is_empty(), "nothing on stdout: {stdout}");
    }
    // A daemon that is not there: exit 1.
    let (code, stdout, stderr) = run(Some(&agent.token), "http://127.0.0.1:1");
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("cannot reach"), "{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
}

#[test]
fn whoami_names_the_role_and_the_agent() {
    let (w, agent) = wallet_with_agent(Kind::Sqlite);
    assert_eq!(w.get("/v1/whoami", &w.operator).expect(200, "operator"), json!({"role": "operator"}));
    assert_eq!(w.get("/v1/whoami", &w.network).expect(200, "network"), json!({"role": "network"}));
    assert_eq!(
        w.get("/v1/whoami", &agent.token).expect(200, "agent"),
        json!({"role": "agent", "agent_id": agent.id, "name": "mcp bot"})
    );
    w.get("/v1/whoami", "sg_not_a_token").refused(401, "invalid_token", "a bad token");
    w.send("GET", "/v1/whoami", None, &[], Body::None).refused(401, "missing_token", "no token");
    // The CLI says the same.
    let out = spendguard()
        .args(["whoami", "--json"])
        .env("SPENDGUARD_URL", &w.daemon.url)
        .env("SPENDGUARD_TOKEN", &agent.token)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let me: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(me["agent_id"], agent.id.as_str());
    let out = spendguard()
        .arg("whoami")
        .env("SPENDGUARD_URL", &w.daemon.url)
        .env("SPENDGUARD_TOKEN", &w.operator)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("operator"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// The audit records of `kind`, oldest first.
fn audit_of(w: &Wallet, kind: &str) -> Vec<Value> {
    let all = w.read("/v1/audit?limit=1000");
    all["records"].as_array().unwrap().iter().filter(|r| r["kind"] == kind).cloned().collect()
}

#[test]
fn a_preview_holds_nothing_makes_no_card_and_is_in_the_trail() {
    let (w, agent) = wallet_with_agent(Kind::Sqlite);
    let preview = |body: Value| w.post("/v1/spends/preview", &agent.token, body);

    let allow = preview(spend("10.00", "api.openai.com", "5734")).expect(200, "preview 10.00");
    assert_eq!(allow["decision"], "allow", "{allow}");
    assert_eq!(allow["reasons"], json!([]), "{allow}");
    assert!(allow["card_terms"].is_object(), "{allow}");
    let deny = preview(spend("10.00", "bets.example.com", "7995")).expect(200, "preview at 7995");
    assert_eq!(deny["decision"], "deny", "{deny}");
    assert!(deny["reasons"].to_string().contains("7995"), "{deny}");
    let ask = preview(spend("60.00", "api.openai.com", "5734")).expect(200, "preview 60.00");
    assert_eq!(ask["decision"], "require_approval", "{ask}");
    assert!(ask["reasons"].to_string().contains("approval-threshold"), "{ask}");

    // Nothing held, no spend, no card.
    w.assert_wallet("100.00", "0.00", "0.00");
    assert_eq!(w.read("/v1/spends")["spends"], json!([]));
    assert_eq!(w.read("/v1/cards")["cards"], json!([]));
    // Each preview is in the trail, with the policies' decisions.
    let recorded = audit_of(&w, "spend_preview");
    assert_eq!(recorded.len(), 3, "{recorded:?}");
    let text = recorded[1].to_string();
    assert!(
        text.contains("bets.example.com") && text.contains("merchant-rules") && text.contains("\"deny\""),
        "{text}"
    );
    assert!(w.read("/v1/audit/verify")["ok"] == true, "the chain holds");

    // Bad input: a clear 4xx, nothing recorded.
    preview(spend("0", "api.openai.com", "5734")).refused(422, "invalid_amount", "a zero amount");
    preview(spend("1.001", "api.openai.com", "5734")).refused(422, "invalid_amount", "too many decimals");
    preview(spend("1.00", "api.openai\u{200b}.com", "5734")).refused(
        422,
        "invalid_field",
        "an invisible character",
    );
    let mut extra = spend("1.00", "api.openai.com", "5734");
    extra["approved"] = json!(true);
    assert_eq!(preview(extra).status, 422, "an unknown field");
    w.post("/v1/spends/preview", &w.operator, spend("1.00", "api.openai.com", "5734")).refused(
        403,
        "forbidden",
        "the operator may not preview",
    );
    w.post("/v1/spends/preview", &w.network, spend("1.00", "api.openai.com", "5734")).refused(
        403,
        "forbidden",
        "the network may not preview",
    );
    w.send("POST", "/v1/spends/preview", None, &[], Body::Json(spend("1.00", "a.example", "5734"))).refused(
        401,
        "missing_token",
        "no token",
    );
    assert_eq!(audit_of(&w, "spend_preview").len(), 3, "refused previews record nothing");
    w.assert_wallet("100.00", "0.00", "0.00");

    // The CLI previews with the same flags as `spend propose`.
    let out = spendguard()
        .args([
            "spend",
            "preview",
            "--amount",
            "60.00",
            "--currency",
            "USD",
            "--merchant-id",
            "api.openai.com",
        ])
        .args(["--merchant-name", "OpenAI", "--mcc", "5734", "--purpose", "credits", "--json"])
        .env("SPENDGUARD_URL", &w.daemon.url)
        .env("SPENDGUARD_TOKEN", &agent.token)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let cli: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(cli["decision"], "require_approval", "{cli}");

    // And over MCP: check_spend.
    let mcp = Mcp::connect(&w, &agent.token, Over::Http);
    let checked = mcp.ok("check_spend", spend("10.00", "api.openai.com", "5734"));
    assert_eq!(checked["decision"], "allow", "{checked}");
    mcp.refused("check_spend", spend("-1.00", "api.openai.com", "5734"), "invalid_amount");
    assert_eq!(audit_of(&w, "spend_preview").len(), 5);
    w.assert_wallet("100.00", "0.00", "0.00");
    assert_eq!(w.read("/v1/spends")["spends"], json!([]));
}
