//! Bad input. Tables of malformed requests, route by route. Each must be refused with a
//! 4xx and a JSON error carrying its specific code, and leave the database as
//! it was: every row of every table, read beside the daemon before and after
//! the table runs, besides what the API shows. Where a route has a real target
//! the request names it (the agent's open card, its pending spend, the agent
//! itself, a valid module), so a malformed request let through would change
//! something.
//!
//! Not refused, on purpose: a route that takes no body (approve, revoke, void)
//! ignores one; a JSON body is read whatever its Content-Type says; odd but
//! printable text (accents in either normal form, other scripts, emoji, zero
//! width joiners in names) and amounts like `+12.50` or `12.500` are accepted
//! and stored as sent: `bad_input_that_is_fine_is_stored_verbatim`.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::support::{
    AgentToken, Bad, Body, Wallet, approved, bad, bearer, db_diff, db_dump, guests, proposal, send_raw,
};

/// What the operator can see, compared before and after a table.
const BAD_INPUT_VIEWS: [&str; 7] = [
    "/v1/wallet",
    "/v1/policies",
    "/v1/agents",
    "/v1/spends?limit=1000",
    "/v1/cards",
    "/v1/approvals",
    "/v1/audit?limit=1000",
];

/// A wallet with something of everything a malformed request could spoil.
/// Nothing in it can expire while a table runs: cards live 900 s and
/// approvals 600 s by default, so the sweeper has nothing to write.
struct Targets {
    bot: AgentToken,
    /// A revoked agent's id.
    gone: String,
    /// The bot's spend waiting for the operator.
    pending: String,
    approved: String,
    denied: String,
    /// The open card of `approved`, with its PAN and CVV.
    card: Value,
    voided: String,
}

fn bot_policies() -> Value {
    json!([
        {"policy": "spend-limit", "config": {"limit": "500.00", "currency": "USD"}},
        {"policy": "approval-threshold", "config": {"threshold": "100.00", "currency": "USD"}},
    ])
}

fn bad_input_wallet() -> (Wallet, Targets) {
    let w = Wallet::new();
    let deposit = Body::Json(json!({"amount": "1000.00", "currency": "USD"}));
    let auth = bearer(&w.operator);
    w.send("POST", "/v1/wallet/deposits", Some(&auth), &[("Idempotency-Key", "funding")], deposit)
        .expect(201, "deposit");
    w.upload("spend-limit", "spend-limit");
    w.upload("approval-threshold", "approval-threshold");
    let bot = w.create_agent("bot", bot_policies());
    let propose = |amount: &str, status: &str| {
        let body = Body::Json(proposal(amount, "api.openai.com", "5734"));
        let key = format!("order-{amount}");
        let reply =
            w.send("POST", "/v1/spends", Some(&bearer(&bot.token)), &[("Idempotency-Key", &key)], body);
        let spend = reply.expect(201, &format!("propose {amount}"));
        assert_eq!(spend["status"], status, "{spend}");
        spend
    };
    let approved = propose("10.00", "approved");
    let voided = propose("20.00", "approved")["card"]["id"].as_str().unwrap().to_owned();
    w.post(&format!("/v1/cards/{voided}/void"), &w.operator, json!({})).expect(200, "void");
    let pending = propose("150.00", "pending_approval")["id"].as_str().unwrap().to_owned();
    let denied = propose("600.00", "denied")["id"].as_str().unwrap().to_owned();
    let gone = w.create_agent("gone", json!([])).id;
    w.post(&format!("/v1/agents/{gone}/revoke"), &w.operator, json!({})).expect(200, "revoke");
    let targets = Targets {
        bot,
        gone,
        pending,
        approved: approved["id"].as_str().unwrap().to_owned(),
        denied,
        card: approved["card"].clone(),
        voided,
    };
    (w, targets)
}

/// Send every case, each on a connection of its own, then check each got its
/// refusal, and that neither the database nor anything the API shows changed.
/// Every case is tried, so one run shows every wrong answer.
fn assert_refused_changing_nothing(w: &Wallet, cases: &[Bad]) {
    let views = || BAD_INPUT_VIEWS.map(|p| (p, w.read(p)));
    let (api_before, db_before) = (views(), db_dump(&w.data));
    let mut wrong = Vec::new();
    for bad in cases {
        assert!(
            (400..500).contains(&bad.status) && !bad.code.is_empty(),
            "no refusal for {}",
            bad.describe()
        );
        let checked = send_raw(w, bad).and_then(|(reply, content_type)| {
            reply.check(bad.status, Some(bad.code))?;
            if content_type.starts_with("application/json") {
                Ok(())
            } else {
                Err(format!("a JSON error with Content-Type `{content_type}`"))
            }
        });
        if let Err(e) = checked {
            wrong.push(format!("{}: {e}", bad.describe()));
        }
    }
    let (api_after, db_after) = (views(), db_dump(&w.data));
    let db = db_diff(&db_before, &db_after);
    let api: Vec<&str> =
        api_before.iter().zip(&api_after).filter(|(b, a)| b != a).map(|((p, _), _)| *p).collect();
    assert!(
        wrong.is_empty() && db.is_empty() && api.is_empty(),
        "{} of {} refusals wrong:\n{}\n\nthe database changed:\n{db}\nthe API shows a change at {api:?}; the daemon's log:\n{}",
        wrong.len(),
        cases.len(),
        wrong.join("\n"),
        w.daemon.log(),
    );
}

/// `base` with the value at `pointer` replaced (or added, in an object).
fn with(base: &Value, pointer: &str, value: Value) -> Value {
    let mut v = base.clone();
    let (parent, key) = pointer.rsplit_once('/').expect("a JSON pointer");
    match v.pointer_mut(parent) {
        Some(Value::Object(map)) => {
            map.insert(key.to_owned(), value);
        }
        Some(Value::Array(list)) => list[key.parse::<usize>().unwrap()] = value,
        _ => panic!("no `{parent}` in {base}"),
    }
    v
}

/// `base` without the value at `pointer`.
fn without(base: &Value, pointer: &str) -> Value {
    let mut v = base.clone();
    let (parent, key) = pointer.rsplit_once('/').expect("a JSON pointer");
    match v.pointer_mut(parent) {
        Some(Value::Object(map)) => assert!(map.remove(key).is_some(), "no `{pointer}` in {base}"),
        Some(Value::Array(list)) => drop(list.remove(key.parse::<usize>().unwrap())),
        _ => panic!("no `{parent}` in {base}"),
    }
    v
}

/// `base` as JSON text with the value at `pointer` written as `raw`: what
/// serde_json never writes (a lone surrogate, `1e400`, a duplicate key).
fn with_raw(base: &Value, pointer: &str, raw: &str) -> Vec<u8> {
    let mark = json!("\u{1}raw\u{1}");
    let text = with(base, pointer, mark.clone()).to_string();
    assert!(text.contains(&mark.to_string()));
    text.replace(&mark.to_string(), raw).into_bytes()
}

/// Values of every other JSON type than `good`'s (`null` too unless the
/// field is an option).
fn wrong_types(good: &Value, null_ok: bool) -> Vec<Value> {
    let kind = std::mem::discriminant;
    [json!(null), json!(true), json!(7), json!(-2.5), json!("7"), json!([good]), json!({"value": good})]
        .into_iter()
        .filter(|v| kind(v) != kind(good) && !(null_ok && v.is_null()))
        .collect()
}

/// What is wrong with a body as JSON, whatever its fields: broken syntax,
/// not an object, trailing data, a byte order mark, bytes that are not
/// UTF-8, a duplicate key, nesting deeper than the parser goes.
fn broken_json(base: &Value) -> Vec<Vec<u8>> {
    let text = base.to_string();
    let (first, value) = base.as_object().and_then(|m| m.iter().next()).expect("an object with a field");
    let mut out: Vec<Vec<u8>> = vec![
        b"{".to_vec(),
        text[..text.len() - 1].into(),
        format!("{text} x").into(),
        format!("{text}{text}").into(),
        format!("\u{feff}{text}").into(),
        text.replace('"', "'").into(),
        format!("/* a comment */ {text}").into(),
        format!("{{\"{first}\": {value}, {}", &text[1..]).into(),
        b"null".to_vec(),
        b"true".to_vec(),
        b"12.50".to_vec(),
        b"\"12.50\"".to_vec(),
        format!("[{text}]").into(),
        format!("{}]", "[".repeat(10_000)).into(),
    ];
    // Not UTF-8: a byte that never starts a character, inside the first key.
    let mut latin1 = text.clone().into_bytes();
    latin1.insert(2, 0xff);
    out.push(latin1);
    out
}

/// A body over the 64 KiB limit: `base` with a long extra field.
fn oversized(base: &Value) -> Value {
    with(base, "/padding", json!("x".repeat(70 * 1024)))
}

/// Amounts that are no amount: sign, zero, too many decimals, exponents,
/// white space, separators, other digits, beyond the largest, not numbers.
fn bad_amounts() -> Vec<String> {
    let mut out: Vec<String> = [
        "-1",
        "-0.01",
        "-0",
        "0",
        "0.00",
        "0.001",
        "10.001",
        "1.00000000000000000000000000001",
        "1e3",
        "1E3",
        "1e-2",
        "0x10",
        "NaN",
        "inf",
        "Infinity",
        "",
        " ",
        " 1.00",
        "1.00 ",
        "\t1.00",
        "1.00\n",
        "1 000",
        "1,00",
        "1,000.00",
        "1_000",
        "1.",
        ".5",
        "+-1",
        "--1",
        "1..0",
        "1.0.0",
        "$1.00",
        "1.00USD",
        "1.00\u{0}",
        "½",
        "١٢",
        "１２",
        "1000000000.01",
        "1000000001",
        "99999999999999999999999999999",
    ]
    .map(String::from)
    .into();
    out.push("9".repeat(100));
    out.push(format!("0.{}1", "0".repeat(60)));
    out
}

const BAD_CURRENCIES: [&str; 14] = [
    "XYZ",
    "usd",
    "Usd",
    "US",
    "USDD",
    "",
    " USD",
    "USD ",
    "U\u{0}SD",
    "ＵＳＤ",
    "US$",
    "$",
    "💵",
    "USD\u{200b}",
];

/// Text a person typed, spoiled: control characters (C0, DEL, C1), direction
/// overrides and isolates that reorder what a reader sees, line and paragraph
/// separators, and one character too many (in ASCII, in two- and four-byte
/// characters: the limit counts characters).
fn bad_texts(max: usize) -> Vec<String> {
    let mut out: Vec<String> = [
        "a\u{0}b",
        "\u{0}",
        "a\nb",
        "a\r\nb",
        "a\tb",
        "\u{1b}[31mred\u{1b}[0m",
        "a\u{7f}",
        "a\u{85}b",
        "a\u{9b}31m",
        "moc.\u{202e}evil",
        "\u{2066}abc\u{2069}",
        "a\u{202a}b",
        "a\u{200e}\u{202d}b",
        "a\u{2028}b",
        "a\u{2029}b",
    ]
    .map(String::from)
    .into();
    out.push("a".repeat(max + 1));
    out.push("é".repeat(max + 1));
    out.push("\u{1f600}".repeat(max + 1));
    out
}

/// Text that must not be empty, left empty.
const BLANKS: [&str; 4] = ["", " ", "   ", "\u{a0}"];

/// Identifiers compared exactly (a merchant id is the card's lock): on top of
/// [`bad_texts`] and [`BLANKS`], white space and invisible characters that
/// make two ids look the same.
fn bad_ids() -> Vec<String> {
    let mut out = bad_texts(MAX_NAME_CHARS);
    out.extend(BLANKS.map(String::from));
    out.extend(
        [
            " api.openai.com",
            "api.openai.com ",
            "api openai.com",
            "api.openai.com\u{a0}",
            "api.openai.com\u{3000}",
            "api.openai.com\u{200b}",
            "api.\u{200d}openai.com",
            "api.\u{200c}openai.com",
            "\u{feff}api.openai.com",
            "api.open\u{ad}ai.com",
            "api.openai.com\u{2060}",
            "api.openai.com\u{e0041}",
            "api.openai.com\u{fe0f}",
        ]
        .map(String::from),
    );
    out
}

/// Lone surrogates, as JSON escapes: no character at all.
const LONE_SURROGATES: [&str; 4] = [r#""\ud800""#, r#""a\udc00b""#, r#""\ud800\u0041""#, r#""\udfff\ud800""#];

/// Longest merchant id, merchant name, agent name or label the API takes.
const MAX_NAME_CHARS: usize = 200;
/// Longest purpose or deny reason.
const MAX_PURPOSE_CHARS: usize = 1000;

#[test]
fn bad_input_bodies_change_nothing() {
    let (w, t) = bad_input_wallet();
    let (op, bot, net) = (w.operator.as_str(), t.bot.token.as_str(), w.network.as_str());
    let card = &t.card;
    let attachment = json!({"policy": "spend-limit", "config": {"limit": "50.00", "currency": "USD"}});
    let charge = json!({"pan": card["pan"], "cvv": card["cvv"], "exp_month": card["exp_month"],
                        "exp_year": card["exp_year"], "amount": "1.00", "currency": "USD",
                        "merchant_id": "api.openai.com"});
    let put_policies = format!("/v1/agents/{}/policies", t.bot.id);
    let deny = format!("/v1/approvals/{}/deny", t.pending);
    // Each JSON route with a body it would take (and act on): every case
    // below spoils it one way. (token, method, path, body, its fields:
    // (pointer, required, null accepted), where unknown fields go.)
    type Fields = &'static [(&'static str, bool, bool)];
    type JsonRoute<'a> = (&'a str, &'static str, String, Value, Fields, &'static [&'static str]);
    let routes: Vec<JsonRoute> = vec![
        (
            op,
            "POST",
            "/v1/wallet/deposits".into(),
            json!({"amount": "5.00", "currency": "USD"}),
            &[("/amount", true, false), ("/currency", true, false)],
            &[""],
        ),
        (
            bot,
            "POST",
            "/v1/spends".into(),
            proposal("5.00", "api.openai.com", "5734"),
            &[
                ("/amount", true, false),
                ("/currency", true, false),
                ("/merchant", true, false),
                ("/merchant/id", true, false),
                ("/merchant/name", true, false),
                ("/merchant/mcc", true, false),
                ("/merchant/country", false, false),
                ("/purpose", false, false),
            ],
            &["", "/merchant"],
        ),
        (
            op,
            "POST",
            "/v1/agents".into(),
            json!({"name": "new bot", "labels": {"team": "research"}, "policies": [attachment]}),
            &[
                ("/name", true, false),
                ("/labels", false, false),
                ("/labels/team", false, false),
                ("/policies", false, false),
                ("/policies/0", false, false),
                ("/policies/0/policy", true, false),
            ],
            &["", "/policies/0"],
        ),
        (
            op,
            "PUT",
            put_policies.clone(),
            json!({"policies": [attachment]}),
            &[("/policies", true, false), ("/policies/0", false, false), ("/policies/0/policy", true, false)],
            &["", "/policies/0"],
        ),
        (op, "POST", deny.clone(), json!({"reason": "too dear"}), &[("/reason", false, true)], &[""]),
        (
            net,
            "POST",
            "/v1/network/authorizations".into(),
            charge.clone(),
            &[
                ("/pan", true, false),
                ("/cvv", true, false),
                ("/exp_month", true, false),
                ("/exp_year", true, false),
                ("/amount", true, false),
                ("/currency", true, false),
                ("/merchant_id", true, false),
            ],
            &[""],
        ),
    ];
    let mut cases = Vec::new();
    for (token, method, path, base, fields, objects) in &routes {
        let req = || bad(token, method, path.as_str());
        let invalid_json = |body: Vec<u8>| req().text(body).refused(422, "invalid_json");
        // An empty body is how a deny says "no reason"; a bare list is a
        // list of attachments.
        if !path.ends_with("/deny") {
            cases.push(invalid_json(Vec::new()));
        }
        cases.extend(broken_json(base).into_iter().map(invalid_json));
        if *method != "PUT" {
            cases.push(invalid_json(b"[]".to_vec()));
        }
        for &(pointer, required, null_ok) in *fields {
            let good = base.pointer(pointer).unwrap();
            for wrong in wrong_types(good, null_ok) {
                cases.push(req().json(&with(base, pointer, wrong)).refused(422, "invalid_json"));
            }
            if required {
                cases.push(req().json(&without(base, pointer)).refused(422, "invalid_json"));
            }
            if good.is_string() {
                for raw in LONE_SURROGATES {
                    cases.push(invalid_json(with_raw(base, pointer, raw)));
                }
            }
        }
        for object in *objects {
            cases.push(
                req()
                    .json(&with(base, &format!("{object}/colour"), json!("red")))
                    .refused(422, "invalid_json"),
            );
            // A field's name in other case is another (unknown) field.
            if let Some((key, value)) =
                base.pointer(object).and_then(Value::as_object).and_then(|m| m.iter().next())
            {
                let renamed = with(
                    &without(base, &format!("{object}/{key}")),
                    &format!("{object}/{}", key.to_uppercase()),
                    value.clone(),
                );
                cases.push(req().json(&renamed).refused(422, "invalid_json"));
            }
        }
        cases.push(req().json(&oversized(base)).refused(413, "too_large"));
        cases.push(req().json(&oversized(base)).chunked().refused(413, "too_large"));
        // Amounts and currencies, wherever money is named.
        if base.get("amount").is_some() {
            for amount in bad_amounts() {
                cases.push(req().json(&with(base, "/amount", json!(amount))).refused(422, "invalid_amount"));
            }
            for currency in BAD_CURRENCIES {
                cases.push(
                    req().json(&with(base, "/currency", json!(currency))).refused(422, "invalid_amount"),
                );
            }
            for (amount, currency) in
                [("1.5", "JPY"), ("0.5", "KRW"), ("1.0001", "KWD"), ("1.0000001", "USDC")]
            {
                let body = with(&with(base, "/amount", json!(amount)), "/currency", json!(currency));
                cases.push(req().json(&body).refused(422, "invalid_amount"));
            }
        }
    }

    // Text fields: what a person typed, and ids compared exactly.
    let spend = proposal("5.00", "api.openai.com", "5734");
    let new_agent = json!({"name": "new bot", "labels": {"team": "research"}});
    let reason = json!({"reason": "too dear"});
    // (token, method, path, a body it would take, the field, what to put there)
    type TextCase<'a> = (&'a str, &'static str, &'a str, &'a Value, &'static str, Vec<String>);
    let texts: Vec<TextCase> = vec![
        (bot, "POST", "/v1/spends", &spend, "/merchant/id", bad_ids()),
        (net, "POST", "/v1/network/authorizations", &charge, "/merchant_id", bad_ids()),
        (bot, "POST", "/v1/spends", &spend, "/merchant/name", bad_texts(MAX_NAME_CHARS)),
        (bot, "POST", "/v1/spends", &spend, "/purpose", bad_texts(MAX_PURPOSE_CHARS)),
        (
            op,
            "POST",
            "/v1/agents",
            &new_agent,
            "/name",
            [bad_texts(MAX_NAME_CHARS), BLANKS.map(String::from).into()].concat(),
        ),
        (op, "POST", "/v1/agents", &new_agent, "/labels/team", bad_texts(MAX_NAME_CHARS)),
        (op, "POST", deny.as_str(), &reason, "/reason", bad_texts(MAX_PURPOSE_CHARS)),
    ];
    for (token, method, path, base, pointer, values) in texts {
        for value in values {
            cases.push(
                bad(token, method, path)
                    .json(&with(base, pointer, json!(value)))
                    .refused(422, "invalid_field"),
            );
        }
    }
    // A label's name is text too, and must not be blank; at most 32 labels.
    for key in [bad_texts(MAX_NAME_CHARS), BLANKS.map(String::from).into()].concat() {
        let body = with(&new_agent, "/labels", json!({ key: "x" }));
        cases.push(bad(op, "POST", "/v1/agents").json(&body).refused(422, "invalid_field"));
    }
    let many: serde_json::Map<String, Value> = (0..33).map(|i| (format!("label{i}"), json!("x"))).collect();
    cases.push(
        bad(op, "POST", "/v1/agents")
            .json(&with(&new_agent, "/labels", Value::Object(many)))
            .refused(422, "invalid_field"),
    );

    // Merchant category and country.
    for mcc in ["573", "57340", "57a4", "", " 573", "5734 ", "５７３４", "٥٧٣٤", "-573", "5.73", "57\u{0}4"]
    {
        cases.push(
            bad(bot, "POST", "/v1/spends")
                .json(&with(&spend, "/merchant/mcc", json!(mcc)))
                .refused(422, "invalid_field"),
        );
    }
    for country in ["us", "USA", "U", "1A", "ÜS", " US", "U S", "\u{0}\u{0}", "ＵＳ"] {
        let body = with(&spend, "/merchant/country", json!(country));
        cases.push(bad(bot, "POST", "/v1/spends").json(&body).refused(422, "invalid_field"));
    }

    // Card data, on the open card: let through, a charge would capture it.
    let authorize = |body: Value| bad(net, "POST", "/v1/network/authorizations").json(&body);
    for pan in [
        "4111",
        "",
        "4000 0000 0000 0002",
        "4000-0000-0000-0002",
        "400000000000000a",
        "40000000000000000002",
        "４０００００００００００００２",
    ] {
        cases.push(authorize(with(&charge, "/pan", json!(pan))).refused(422, "invalid_card_data"));
    }
    for cvv in ["12", "12345", "12a", "", " 123", "１２３"] {
        cases.push(authorize(with(&charge, "/cvv", json!(cvv))).refused(422, "invalid_card_data"));
    }
    for month in [0, 13, 255] {
        cases.push(authorize(with(&charge, "/exp_month", json!(month))).refused(422, "invalid_card_data"));
    }
    for (pointer, raw) in [
        ("/exp_month", "256"),
        ("/exp_month", "-1"),
        ("/exp_month", "12.0"),
        ("/exp_month", "1e400"),
        ("/exp_year", "-1"),
        ("/exp_year", "65536"),
        ("/exp_year", "2030.5"),
        ("/exp_year", "99999999999999999999999"),
    ] {
        cases.push(
            bad(net, "POST", "/v1/network/authorizations")
                .text(with_raw(&charge, pointer, raw))
                .refused(422, "invalid_json"),
        );
    }
    // Serde reads a struct from an array too, its fields in order: the API
    // takes objects with named fields, an array in their place is a wrong type.
    let merchant = json!(["api.openai.com", "OpenAI", "5734", "US"]);
    let positional_attachment = json!([["spend-limit", {"limit": "50.00", "currency": "USD"}]]);
    let positional: Vec<(&str, &'static str, &str, Value)> = vec![
        (op, "POST", "/v1/wallet/deposits", json!(["5.00", "USD"])),
        (bot, "POST", "/v1/spends", json!(["5.00", "USD", spend["merchant"], "a purpose"])),
        (bot, "POST", "/v1/spends", with(&spend, "/merchant", merchant)),
        (op, "POST", "/v1/agents", json!(["new bot", {"team": "research"}, [attachment]])),
        (op, "POST", "/v1/agents", with(&new_agent, "/policies", positional_attachment.clone())),
        (op, "PUT", put_policies.as_str(), json!([[attachment]])),
        (op, "PUT", put_policies.as_str(), positional_attachment.clone()),
        (op, "PUT", put_policies.as_str(), json!({"policies": positional_attachment})),
        (op, "POST", deny.as_str(), json!(["too dear"])),
        (
            net,
            "POST",
            "/v1/network/authorizations",
            json!([
                card["pan"],
                card["cvv"],
                card["exp_month"],
                card["exp_year"],
                "1.00",
                "USD",
                "api.openai.com"
            ]),
        ),
    ];
    for (token, method, path, body) in positional {
        cases.push(bad(token, method, path).json(&body).refused(422, "invalid_json"));
    }
    // The bare list of attachments, spoilt.
    for body in [
        json!([with(&attachment, "/colour", json!("red"))]),
        json!([{"config": {}}]),
        json!([{"policy": 7}]),
        json!(["spend-limit"]),
        json!([null]),
        json!([[]]),
    ] {
        cases.push(bad(op, "PUT", put_policies.as_str()).json(&body).refused(422, "invalid_json"));
    }
    assert_refused_changing_nothing(&w, &cases);
}

#[test]
fn bad_input_routes_queries_and_headers_change_nothing() {
    let (w, t) = bad_input_wallet();
    let (op, bot) = (w.operator.as_str(), t.bot.token.as_str());
    let card = t.card["id"].as_str().unwrap();
    let mut cases = Vec::new();

    // Ids in paths that name nothing: unknown, another kind's id, the real
    // id spoilt, bytes that decode to no UTF-8, control and direction
    // characters, dot segments, very long.
    let bad_ids = |real: &str, other: &str| -> Vec<String> {
        let mut ids: Vec<String> = [
            "",
            "sp_nothing",
            "ag_nothing",
            "card_nothing",
            "%00",
            "%FF",
            "%C0%AF",
            "%ED%A0%80",
            "%E2%80%AE",
            "%0A",
            "%1B%5B31m",
            "%2F",
            "..",
            "%2E%2E",
            ".",
            "%",
            "%zz",
            "%u202e",
            "*",
            "null",
            "0",
            "-1",
        ]
        .map(String::from)
        .into();
        ids.extend([
            other.to_owned(),
            real.to_uppercase(),
            format!("{real}%20"),
            format!("%20{real}"),
            format!("{real}%00"),
            format!("{real}%E2%80%8B"),
            format!("{real}x"),
            real[..real.len() - 1].to_owned(),
            "a".repeat(10_000),
        ]);
        ids
    };
    // (token, method, path with `{}` for the id, body, the real id, another kind's id)
    type ById<'a> = (&'a str, &'static str, String, Option<Value>, String, String);
    let by_id: Vec<ById> = vec![
        (bot, "GET", "/v1/spends/{}".into(), None, t.approved.clone(), t.bot.id.clone()),
        (op, "GET", "/v1/spends/{}".into(), None, t.approved.clone(), card.to_owned()),
        (op, "POST", "/v1/approvals/{}/approve".into(), None, t.pending.clone(), t.bot.id.clone()),
        (
            op,
            "POST",
            "/v1/approvals/{}/deny".into(),
            Some(json!({"reason": "no"})),
            t.pending.clone(),
            card.to_owned(),
        ),
        (op, "POST", "/v1/agents/{}/revoke".into(), None, t.bot.id.clone(), t.approved.clone()),
        (
            op,
            "PUT",
            "/v1/agents/{}/policies".into(),
            Some(json!({"policies": []})),
            t.bot.id.clone(),
            t.pending.clone(),
        ),
        (op, "POST", "/v1/cards/{}/void".into(), None, card.to_owned(), t.approved.clone()),
    ];
    for (token, method, template, body, real, other) in &by_id {
        for id in bad_ids(real, other) {
            let mut req = bad(token, method, template.replace("{}", &id));
            if let Some(body) = body {
                req = req.json(body);
            }
            cases.push(req.refused(404, "not_found"));
        }
    }

    // Routes that do not exist, near ones that do.
    for path in [
        "/",
        "/v1",
        "/v1/",
        "/v1/nope",
        "/v2/wallet",
        "/v1/wallet/",
        "/V1/wallet",
        "/v1//wallet",
        "/v1/spends/",
        "/v1/spends/x/y",
        "/v1/cards/x/void/again",
        "/v1/approvals/x/maybe",
        "/v1/wallet%2F",
        "/v1/../v1/wallet",
        "/healthz/",
    ] {
        cases.push(bad(op, "GET", path).refused(404, "not_found"));
    }
    let deposit = json!({"amount": "5.00", "currency": "USD"});
    cases.push(bad(op, "POST", "/v1/wallet/deposit").json(&deposit).refused(404, "not_found"));
    cases.push(bad(op, "POST", "/v1/wallet/deposits/").json(&deposit).refused(404, "not_found"));

    // Routes that exist, with a method they do not take.
    let spend = proposal("5.00", "api.openai.com", "5734");
    for (method, path) in [
        ("PUT", "/v1/wallet".to_owned()),
        ("DELETE", "/v1/spends".to_owned()),
        ("PATCH", "/v1/agents".to_owned()),
        ("GET", "/v1/wallet/deposits".to_owned()),
        ("GET", "/v1/network/authorizations".to_owned()),
        ("DELETE", format!("/v1/cards/{card}/void")),
        ("GET", format!("/v1/cards/{card}/void")),
        ("POST", "/v1/audit".to_owned()),
        ("GET", format!("/v1/approvals/{}/approve", t.pending)),
        ("PUT", format!("/v1/spends/{}", t.approved)),
        ("DELETE", format!("/v1/agents/{}/policies", t.bot.id)),
        ("POST", format!("/v1/agents/{}/policies", t.bot.id)),
        ("PUT", "/v1/spends".to_owned()),
        ("OPTIONS", "/v1/wallet".to_owned()),
        ("TRACE", "/v1/wallet".to_owned()),
        ("FROB", "/v1/wallet".to_owned()),
    ] {
        let mut req = bad(op, method, path);
        if method != "GET" {
            req = req.json(&spend);
        }
        cases.push(req.refused(405, "method_not_allowed"));
    }

    // Query strings: malformed on the routes that take one, and any at all on
    // the routes that take none (as an unknown field in a body is refused).
    for query in [
        "limit=abc",
        "limit=-1",
        "limit=1.5",
        "limit=1e2",
        "limit=99999999999999999999999999",
        "limit=",
        "limit=%FF",
        "limit=%00",
        "limit=1&limit=2",
        "colour=red",
        "Limit=5",
        "limit",
    ] {
        cases.push(bad(op, "GET", format!("/v1/spends?{query}")).refused(422, "invalid_query"));
        cases.push(bad(bot, "GET", format!("/v1/spends?{query}")).refused(422, "invalid_query"));
    }
    for query in [
        "after=-1",
        "after=x",
        "after=18446744073709551616",
        "limit=x",
        "after=1&after=2",
        "colour=red",
        "after=1.0",
    ] {
        cases.push(bad(op, "GET", format!("/v1/audit?{query}")).refused(422, "invalid_query"));
    }
    for (token, method, path, body) in [
        (op, "GET", "/v1/wallet".to_owned(), None),
        (op, "GET", "/v1/cards".to_owned(), None),
        (bot, "GET", "/v1/cards".to_owned(), None),
        (op, "GET", "/v1/agents".to_owned(), None),
        (op, "GET", "/v1/approvals".to_owned(), None),
        (op, "GET", "/v1/policies".to_owned(), None),
        (op, "GET", "/v1/audit/verify".to_owned(), None),
        (bot, "GET", format!("/v1/spends/{}", t.approved), None),
        (op, "POST", "/v1/wallet/deposits".to_owned(), Some(deposit.clone())),
        (bot, "POST", "/v1/spends".to_owned(), Some(spend.clone())),
        (op, "POST", format!("/v1/approvals/{}/approve", t.pending), None),
        (op, "POST", format!("/v1/approvals/{}/deny", t.pending), Some(json!({"reason": "no"}))),
        (op, "POST", format!("/v1/agents/{}/revoke", t.bot.id), None),
        (op, "PUT", format!("/v1/agents/{}/policies", t.bot.id), Some(json!({"policies": []}))),
        (op, "POST", format!("/v1/cards/{card}/void"), None),
        (op, "POST", "/v1/agents".to_owned(), Some(json!({"name": "new bot"}))),
    ] {
        for query in ["limit=5", "amount=5", "dry_run=true", "x"] {
            let mut req = bad(token, method, format!("{path}?{query}"));
            if let Some(body) = &body {
                req = req.json(body);
            }
            cases.push(req.refused(422, "invalid_query"));
        }
    }

    // Idempotency keys: empty, too long, not printable ASCII.
    let long_key = "k".repeat(201);
    for key in
        [&b""[..], long_key.as_bytes(), "ключ".as_bytes(), b"\xff\xfe", b"a\tb", "\u{202e}key".as_bytes()]
    {
        cases.push(
            bad(bot, "POST", "/v1/spends")
                .json(&spend)
                .header("Idempotency-Key", key)
                .refused(422, "invalid_idempotency_key"),
        );
        cases.push(
            bad(op, "POST", "/v1/wallet/deposits")
                .json(&deposit)
                .header("Idempotency-Key", key)
                .refused(422, "invalid_idempotency_key"),
        );
    }
    // A key used before, with other parameters.
    for other in ["11.00", "10.01"] {
        let body = proposal(other, "api.openai.com", "5734");
        cases.push(
            bad(bot, "POST", "/v1/spends")
                .json(&body)
                .header("Idempotency-Key", "order-10.00")
                .refused(409, "idempotency_conflict"),
        );
    }
    let other_merchant = proposal("10.00", "api.anthropic.com", "5734");
    cases.push(
        bad(bot, "POST", "/v1/spends")
            .json(&other_merchant)
            .header("Idempotency-Key", "order-10.00")
            .refused(409, "idempotency_conflict"),
    );
    cases.push(
        bad(op, "POST", "/v1/wallet/deposits")
            .json(&deposit)
            .header("Idempotency-Key", "funding")
            .refused(409, "idempotency_conflict"),
    );

    // What the state does not allow: deciding twice, voiding twice, revoking twice.
    for (path, body, code) in [
        (format!("/v1/approvals/{}/approve", t.approved), None, "not_pending_approval"),
        (format!("/v1/approvals/{}/approve", t.denied), None, "not_pending_approval"),
        (format!("/v1/approvals/{}/deny", t.approved), Some(json!({"reason": "no"})), "not_pending_approval"),
        (format!("/v1/approvals/{}/deny", t.denied), None, "not_pending_approval"),
        (format!("/v1/cards/{}/void", t.voided), None, "card_not_open"),
        (format!("/v1/agents/{}/revoke", t.gone), None, "already_revoked"),
    ] {
        let mut req = bad(op, "POST", path);
        if let Some(body) = &body {
            req = req.json(body);
        }
        cases.push(req.refused(409, code));
    }
    assert_refused_changing_nothing(&w, &cases);
}

#[test]
fn bad_input_policies_and_configs_change_nothing() {
    let (w, t) = bad_input_wallet();
    let op = w.operator.as_str();
    let module = guests::bytes("spend-limit");
    let max_module = 8 * 1024 * 1024; // the sandbox's default `max_module_bytes`
    let mut cases = Vec::new();

    // Uploads that are no policy: not Wasm, empty, a header alone, an empty
    // module, cut short, with bytes after its end, the wrong exports, a WASI
    // import, JSON; and one byte over the module size cap.
    let upload = || bad(op, "POST", "/v1/policies?name=new-policy");
    for junk in [
        b"not a wasm module".to_vec(),
        Vec::new(),
        b"\0asm".to_vec(),
        b"\0asm\x01\0\0\0".to_vec(),
        b"\0asm\x0d\0\x01\0".to_vec(),
        b"\0asm\x02\0\0\0".to_vec(),
        module[..module.len() / 2].to_vec(),
        module[..module.len() - 1].to_vec(),
        [module.as_slice(), b"trailing junk"].concat(),
        guests::bytes("guest-wrong-exports"),
        guests::bytes("guest-wasi-import"),
        br#"{"module": "AGFzbQEAAAA="}"#.to_vec(),
    ] {
        cases.push(upload().module(junk).refused(422, "invalid_policy"));
    }
    let mut too_big = module.clone();
    too_big.resize(max_module + 1, 0);
    cases.push(upload().module(too_big.clone()).refused(413, "too_large"));
    cases.push(upload().module(too_big).chunked().refused(413, "too_large"));

    // Names a policy cannot have, with a module that would load.
    for query in [
        "".to_owned(),
        "?".to_owned(),
        "?name=".to_owned(),
        "?name=Bad%20Name".to_owned(),
        "?name=UPPER".to_owned(),
        "?name=a%2Fb".to_owned(),
        "?name=..%2Fetc".to_owned(),
        "?name=spend-limit%402".to_owned(),
        format!("?name={}", "a".repeat(65)),
        "?name=%C3%A9t%C3%A9".to_owned(),
        "?name=x%00".to_owned(),
        "?name=%E2%80%AEx".to_owned(),
        "?name=a%20".to_owned(),
        "?name=%FF".to_owned(),
        "?name=a&name=b".to_owned(),
        "?name=ok&version=2".to_owned(),
        "?nam=x".to_owned(),
    ] {
        cases.push(
            bad(op, "POST", format!("/v1/policies{query}"))
                .module(module.clone())
                .refused(422, "invalid_name"),
        );
    }

    // Attachments: by POST /v1/agents and by PUT on the bot, whose policies a
    // refusal must leave as they are.
    let put = format!("/v1/agents/{}/policies", t.bot.id);
    let attach = |policies: Value| {
        [
            bad(op, "POST", "/v1/agents").json(&json!({"name": "new bot", "policies": policies})),
            bad(op, "PUT", put.as_str()).json(&json!({"policies": policies})),
        ]
    };
    let limit = |config: Value| json!([{"policy": "spend-limit", "config": config}]);
    let mut refuse = |requests: [Bad; 2], status: u16, code: &'static str| {
        cases.extend(requests.map(|r| r.refused(status, code)));
    };
    for policy in ["no-such-policy", "spend-limit@0", "spend-limit@3", "approval-threshold@2"] {
        refuse(attach(json!([{"policy": policy}])), 422, "unknown_policy");
    }
    for policy in [
        "spend-limit@",
        "spend-limit@x",
        "spend-limit@-1",
        "spend-limit@1.0",
        "spend-limit@ 1",
        "spend-limit@4294967296",
        "spend-limit@1@1",
    ] {
        refuse(attach(json!([{"policy": policy}])), 422, "invalid_policy_ref");
    }
    let long_name = "a".repeat(65);
    for policy in [
        "",
        "Spend-Limit",
        "spend limit",
        "@1",
        "../spend-limit",
        "spend-limit\u{0}",
        "spend-limit\u{202e}",
        &long_name,
    ] {
        refuse(attach(json!([{"policy": policy}])), 422, "invalid_name");
    }
    let many: Vec<Value> = (0..33)
        .map(|_| json!({"policy": "spend-limit@1", "config": {"limit": "50.00", "currency": "USD"}}))
        .collect();
    refuse(attach(json!(many)), 422, "too_many_policies");

    // Configs the policy refuses (its `validate-config`), alone or beside a
    // good one.
    for config in [
        json!({}),
        json!(null),
        json!({"limt": "50.00", "currency": "USD"}),
        json!({"limit": "-5", "currency": "USD"}),
        json!({"limit": "ten", "currency": "USD"}),
        json!({"limit": "50.00", "currency": "usd"}),
        json!({"limit": "50.00", "currency": "USD", "window": "0h"}),
        json!({"limit": "50.00", "currency": "USD", "window": "24x"}),
        json!({"limit": "50.00", "currency": "USD", "mcc": "57"}),
        json!({"limit": "50.00", "currency": "USD", "colour": "red"}),
        json!("limit 50.00 USD"),
        json!([]),
        json!(7),
        json!(true),
    ] {
        refuse(attach(limit(config)), 422, "invalid_config");
    }
    for threshold in [json!({"threshold": "-1", "currency": "USD"}), json!({"threshold": "10.00"})] {
        let both = json!([
            {"policy": "spend-limit", "config": {"limit": "50.00", "currency": "USD"}},
            {"policy": "approval-threshold", "config": threshold},
        ]);
        refuse(attach(both), 422, "invalid_config");
    }
    // A config nested deeper than a JSON parser goes is no JSON.
    let deep = format!(
        r#"{{"name": "new bot", "policies": [{{"policy": "spend-limit", "config": {}1{}}}]}}"#,
        "[".repeat(5_000),
        "]".repeat(5_000)
    );
    cases.push(bad(op, "POST", "/v1/agents").text(deep.clone()).refused(422, "invalid_json"));
    assert_refused_changing_nothing(&w, &cases);
}

/// Odd but printable text is no bad input: accents in either Unicode normal
/// form, other scripts and right-to-left text, emoji joined by zero-width
/// joiners, combining marks, text at the length limit; and amounts with a
/// plus sign, a leading zero or trailing zeros. Each is stored as sent (the
/// daemon normalises no text: an id in NFC and the same id in NFD are two
/// merchants, and a card locked to one does not pay the other).
#[test]
fn bad_input_that_is_fine_is_stored_verbatim() {
    let w = Wallet::new();
    w.deposit("1000.00");
    w.upload("spend-limit", "spend-limit");
    let name = "Zoë's bot 🤖";
    let labels = json!({"équipe": "recherche", "👨\u{200d}👩\u{200d}👧": "famille", "لغة": "العربية"});
    let policies = json!([{"policy": "spend-limit", "config": {"limit": "900.00", "currency": "USD"}}]);
    let reply =
        w.post("/v1/agents", &w.operator, json!({"name": name, "labels": labels, "policies": policies}));
    let created = reply.expect(201, "an agent with an odd name");
    assert_eq!(created["name"], name);
    let bot = AgentToken {
        id: created["id"].as_str().unwrap().to_owned(),
        token: created["token"].as_str().unwrap().to_owned(),
    };
    let agents = w.read("/v1/agents");
    let agent = agents["agents"].as_array().unwrap().iter().find(|a| a["id"] == bot.id.as_str()).unwrap();
    assert_eq!((&agent["name"], &agent["labels"]), (&json!(name), &labels), "{agent}");

    let nfc = "bücher.de";
    let nfd = "bu\u{308}cher.de";
    let merchants = [
        (nfc, "Bücherstube Zürich", "Bücher für die Übersetzung 📚"),
        ("buecher.de", "Bu\u{308}cherstube Zu\u{308}rich", "the same shop's name, spelt in NFD"),
        (
            "shop.example.com",
            "Cafe\u{301} \u{5d7}\u{5e0}\u{5d5}\u{5ea} متجر 東京ストア",
            "mixed scripts, no overrides",
        ),
        ("family.example", "👨\u{200d}👩\u{200d}👧 shop, نمی\u{200c}خواهم", "zero-width joiners"),
        ("zalgo.example", "Z\u{324}\u{354}a\u{308}\u{316}l\u{36e}g\u{30c}o", "combining marks"),
        ("example.com\u{1f600}", "emoji in an id", "tab-free, space-free"),
    ];
    let long_id = "a".repeat(MAX_NAME_CHARS);
    let long_name = "é".repeat(MAX_NAME_CHARS);
    let long_purpose = "ü".repeat(MAX_PURPOSE_CHARS);
    let all: Vec<(&str, &str, &str)> = merchants
        .iter()
        .copied()
        .chain([(long_id.as_str(), long_name.as_str(), long_purpose.as_str())])
        .collect();
    let mut cards = BTreeMap::new();
    for (id, name, purpose) in all {
        let body = json!({"amount": "1.00", "currency": "USD",
                          "merchant": {"id": id, "name": name, "mcc": "5942", "country": "DE"}, "purpose": purpose});
        let spend =
            w.post("/v1/spends", &bot.token, body.clone()).expect(201, &format!("a proposal at {id:?}"));
        assert_eq!(spend["status"], "approved", "{spend}");
        assert_eq!(spend["card"]["merchant_id"], id, "the card is locked to the id as sent");
        let stored = w.read(&format!("/v1/spends/{}", spend["id"].as_str().unwrap()));
        assert_eq!(
            (&stored["merchant"], &stored["purpose"]),
            (&body["merchant"], &body["purpose"]),
            "{stored}"
        );
        cards.insert(id.to_owned(), spend["card"].clone());
    }
    // A character beyond the BMP, escaped as a JSON surrogate pair, is that
    // character (a lone surrogate is no JSON: `LONE_SURROGATES`).
    let escaped = r#"{"amount": "1.00", "currency": "USD", "purpose": "an escaped pair",
                     "merchant": {"id": "pair.example", "name": "\ud83d\ude00 shop", "mcc": "5942"}}"#;
    let reply = w.send("POST", "/v1/spends", Some(&bearer(&bot.token)), &[], Body::Text(escaped));
    let spend = reply.expect(201, "a surrogate pair");
    let stored = w.read(&format!("/v1/spends/{}", spend["id"].as_str().unwrap()));
    assert_eq!(stored["merchant"]["name"], "\u{1f600} shop", "{stored}");
    // An id spelt in NFD looks like the NFC one: refused as a lookalike (in a
    // proposal and from the network), never a card of its own.
    let mut body = proposal("1.00", nfd, "5942");
    body["merchant"]["name"] = json!("Bücherstube");
    w.post("/v1/spends", &bot.token, body).refused(422, "confusable_merchant", "an id in NFD");
    let card = &cards[nfc];
    let charge = json!({
        "pan": card["pan"], "cvv": card["cvv"], "exp_month": card["exp_month"], "exp_year": card["exp_year"],
        "amount": "1.00", "currency": "USD", "merchant_id": nfd,
    });
    w.post("/v1/network/authorizations", &w.network, charge).refused(422, "confusable_merchant", "NFD");
    assert_eq!(w.charge(&cards[nfc], "1.00", nfc), approved());

    for (amount, stored) in [("+12.50", "12.50"), ("012.5", "12.50"), ("12.500", "12.50"), ("0.01", "0.01")] {
        let spend = w.propose(&bot, amount, "api.openai.com", "5734").expect(201, amount);
        let record = w.read(&format!("/v1/spends/{}", spend["id"].as_str().unwrap()));
        assert_eq!((&record["amount"], &record["currency"]), (&json!(stored), &json!("USD")), "{amount}");
        assert_eq!(spend["card"]["limit"], stored, "{spend}");
    }
}
