//! Compiled policies are kept in the data directory: a restarted daemon
//! loads them instead of compiling again, and refuses a cached file that was
//! tampered with (compiling the module again instead).

use serde_json::json;

use crate::daemon::Wallet;

/// `spendguard_policy_loads_total` by source, from `/metrics`.
fn loads(w: &Wallet) -> (u64, u64) {
    let text = w.send("GET", "/metrics", None, &[], crate::daemon::Body::None).text;
    let count = |source: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("spendguard_policy_loads_total{{source=\"{source}\"}}")))
            .and_then(|l| l.rsplit(' ').next())
            .map_or(0, |v| v.parse::<f64>().unwrap() as u64)
    };
    (count("compiled"), count("cache"))
}

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
