//! Compiled policies are kept in the data directory: a restarted daemon
//! loads them instead of compiling again, and refuses a cached file that was
//! tampered with (compiling the module again instead).

use serde_json::json;

use crate::support::{Wallet, loads};

#[test]
fn a_restart_loads_compiled_policies_from_the_cache() {
    let mut w = Wallet::new();
    w.deposit("100.00");
    w.upload("spend-limit", "spend-limit");
    let bot = w.create_agent(
        "bot",
        json!([{"policy": "spend-limit", "config": {"limit": "50.00", "currency": "USD"}}]),
    );
    assert_eq!(loads(&w), (1, 0), "the upload compiles it");
    let cache = w.data.join(spendguard::datadir::CACHE_DIR);
    let files: Vec<_> = std::fs::read_dir(&cache).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(files.len(), 1, "one compiled artifact: {files:?}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&cache).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "the cache is the owner's only");
    }

    // Restarted: the first proposal loads the policy from the cache.
    w.stop();
    w.restart();
    assert_eq!(
        w.propose(&bot, "10.00", "api.openai.com", "5734").expect(201, "propose")["status"],
        "approved"
    );
    assert_eq!(loads(&w), (0, 1), "loaded, not compiled");

    // A tampered artifact is never loaded: the module is compiled again.
    let mut bytes = std::fs::read(&files[0]).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&files[0], &bytes).unwrap();
    w.stop();
    w.restart();
    assert_eq!(
        w.propose(&bot, "10.00", "api.openai.com", "5734").expect(201, "propose")["status"],
        "approved"
    );
    assert_eq!(loads(&w), (1, 0), "compiled again, the tampered file refused");
    assert!(w.daemon.log().contains("fails its MAC"), "the refusal is logged");

    // ...and replaced: the next restart loads it again.
    w.stop();
    w.restart();
    assert_eq!(
        w.propose(&bot, "10.00", "api.openai.com", "5734").expect(201, "propose")["status"],
        "approved"
    );
    assert_eq!(loads(&w), (0, 1));
    w.assert_wallet("70.00", "30.00", "0.00");
}

/// At most `policy_cache` compiled policies stay in the daemon's memory: the
/// least recently used are dropped, and loaded again from the compiled
/// cache on disk (never compiled again) when a proposal needs them.
#[test]
fn the_daemon_keeps_at_most_policy_cache_compiled_policies_in_memory() {
    let mut w = Wallet::new();
    w.deposit("1000.00");
    let config = w.data.with_file_name("serve.toml");
    std::fs::write(&config, "policy_cache = 2\n").unwrap();
    w.stop();
    w.restart_with(&["--config", config.to_str().unwrap()]);
    for (name, package) in [
        ("spend-limit", "spend-limit"),
        ("merchant-rules", "merchant-rules"),
        ("threshold", "approval-threshold"),
    ] {
        w.upload(name, package);
    }
    assert_eq!(loads(&w), (3, 0), "each upload compiles its module");
    let agents = [
        w.create_agent(
            "a",
            json!([{"policy": "spend-limit", "config": {"limit": "25.00", "currency": "USD"}}]),
        ),
        w.create_agent("b", json!([{"policy": "merchant-rules", "config": {"block_mcc": ["7995"]}}])),
        w.create_agent(
            "c",
            json!([{"policy": "threshold", "config": {"threshold": "50.00", "currency": "USD"}}]),
        ),
    ];
    // In turn, with room for two: each proposal finds its policy dropped.
    for round in 0..3 {
        for (i, agent) in agents.iter().enumerate() {
            let reply = w.propose(agent, "10.00", "api.openai.com", "5734").expect(201, "propose");
            let expected = if (round, i) == (2, 0) { "denied" } else { "approved" };
            assert_eq!(reply["status"], expected, "round {round}, agent {i}: {reply}");
        }
    }
    // Each attachment (its config checked by the policy) and each of the
    // nine proposals found its policy dropped, and loaded it from disk.
    assert_eq!(loads(&w), (3, 3 + 9), "loaded again from the cache on disk, never compiled");
    // What still decides is the right policy: a's third spend passed its limit.
    let reply = w.propose(&agents[1], "10.00", "casino.example", "7995").expect(201, "propose");
    assert_eq!(reply["status"], "denied", "{reply}");

    // With the default room, each is loaded once and then kept.
    w.stop();
    w.restart();
    for _ in 0..2 {
        for agent in &agents[1..] {
            w.propose(agent, "1.00", "api.openai.com", "5734").expect(201, "propose");
        }
    }
    assert_eq!(loads(&w), (0, 2));
}
