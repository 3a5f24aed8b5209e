//! The `spendguard` binary as a process: running it, and a `serve` on a free
//! port of 127.0.0.1, killed and reaped when dropped.

use std::fs::OpenOptions;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

/// How long `serve` may take to say it listens (it compiles nothing at start,
/// but this machine builds other things while the tests run).
pub(crate) const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a daemon sent SIGTERM may take to exit.
pub(crate) const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

/// What `serve` prints on stdout once it accepts connections.
pub(crate) const LISTENING: &str = "spendguard listening on ";

pub(crate) fn spendguard() -> Command {
    Command::new(env!("CARGO_BIN_EXE_spendguard"))
}

pub(crate) fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

// ---- the daemon process -----------------------------------------------------

/// Config lines that take the per-agent rate out of a load test's way: the
/// crash, race and cluster tests drive agents far faster than the default
/// rate allows, to test durability and atomicity, not the limiter
/// (`transport::an_agent_past_its_rate_is_told_when_to_retry_and_nothing_is_recorded` does).
pub(crate) const NO_RATE_LIMIT: &str = "agent_rate_per_second = 1000000\nagent_burst = 1000000\n";

/// A running `spendguard serve`, killed and reaped when dropped, so a failing
/// test leaves no daemon behind.
pub(crate) struct Daemon {
    pub(crate) child: Child,
    pub(crate) url: String,
    pub(crate) log: PathBuf,
}

impl Daemon {
    /// Start `serve` on a free port, with more arguments (`--config FILE`),
    /// and wait until it says where it listens.
    pub(crate) fn start_with(data: &Path, log: &Path, args: &[&str]) -> Daemon {
        let stderr = OpenOptions::new().create(true).append(true).open(log).expect("log file opens");
        let mut child = spendguard()
            .args(["serve", "--data-dir", path(data), "--listen", "127.0.0.1:0"])
            .args(args)
            .env_remove("SPENDGUARD_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .spawn()
            .expect("`spendguard serve` starts");
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = mpsc::channel();
        // Reads stdout to its end, so the daemon never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(url) = line.strip_prefix(LISTENING)
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(url.trim().to_owned());
                }
            }
        });
        let mut daemon = Daemon { child, url: String::new(), log: log.to_path_buf() };
        match rx.recv_timeout(STARTUP_TIMEOUT) {
            Ok(url) => daemon.url = url,
            Err(RecvTimeoutError::Timeout) => panic!(
                "`spendguard serve` did not print `{LISTENING}URL` within {STARTUP_TIMEOUT:?}; its log:\n{}",
                daemon.log()
            ),
            Err(RecvTimeoutError::Disconnected) => {
                let status = daemon.child.wait().expect("the daemon is reaped");
                panic!("`spendguard serve` exited ({status}) before it listened; its log:\n{}", daemon.log())
            }
        }
        daemon
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub(crate) fn pid(&self) -> String {
        self.child.id().to_string()
    }

    /// SIGKILL, as a crash or the OOM killer ends it: no chance to finish
    /// anything. Only sends the signal (so another thread can crash the
    /// daemon while clients talk to it); [`Daemon::reap`] waits for it.
    pub(crate) fn kill9(&self) {
        let kill = Command::new("kill").args(["-KILL", &self.pid()]).status().expect("`kill` runs");
        assert!(kill.success(), "`kill -KILL {}` failed", self.pid());
    }

    /// Wait for a killed daemon to exit; how it exited.
    pub(crate) fn reap(&mut self) -> ExitStatus {
        self.child.wait().expect("the daemon can be waited for")
    }

    /// SIGTERM, as a service manager stops it; how it exited.
    pub(crate) fn terminate(&mut self) -> ExitStatus {
        let kill = Command::new("kill").args(["-TERM", &self.pid()]).status().expect("`kill` runs");
        assert!(kill.success(), "`kill -TERM {}` failed", self.pid());
        let deadline = Instant::now() + SHUTDOWN_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().expect("the daemon can be waited for") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the daemon did not exit within {SHUTDOWN_TIMEOUT:?} of SIGTERM; its log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a finished command printed on stdout.
pub(crate) fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What a finished command printed on stderr.
pub(crate) fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The daemon's resident memory, from `/proc`.
pub(crate) fn rss_bytes(pid: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status");
    kib * 1024
}
