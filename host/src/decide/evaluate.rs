//! Every attached policy evaluated against one history, each in a fresh
//! sandbox instance, and combined by the one rule ([`super::Tally`]).

use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::{Decided, FaultEntry, PolicyResult, PolicyRun, Tally, Verdict};
use crate::history::History;
use crate::policy::{Decision, SpendRequest};
use crate::sandbox::{Evaluation, LoadedPolicy, Sandbox};
use crate::storage::Attachment;

/// An agent's attachments with their compiled modules, or why one cannot
/// be loaded. Resolved before the storage transaction: the evaluation runs
/// while storage is write-locked, and must not ask storage for anything else.
pub type Loaded = Vec<(Attachment, Result<Arc<LoadedPolicy>, String>)>;

/// Each attachment with its policy version compiled by `load` (from memory,
/// the compiled cache, or compiled), or what `load` said was wrong.
pub fn load_policies(
    attachments: &[Attachment],
    load: impl Fn(&str, u32) -> Result<Arc<LoadedPolicy>, String>,
) -> Loaded {
    attachments.iter().map(|a| (a.clone(), load(&a.policy, a.version))).collect()
}

/// Every attached policy, each in a fresh sandbox, combined: deny wins over
/// require-approval over allow; any fault denies; a policy that could not be
/// loaded denies; no policy denies. `observe` sees each evaluation as it
/// ends (the daemon's metrics).
pub fn evaluate_all(
    sandbox: &Sandbox,
    policies: &Loaded,
    request: &SpendRequest,
    history: Arc<dyn History>,
    observe: &mut dyn FnMut(&Evaluation),
) -> Decided {
    if policies.is_empty() {
        return Verdict::Deny(vec!["no policy attached".into()]).into();
    }
    let mut evaluations = Vec::new();
    let mut tally = Tally::default();
    for (attachment, policy) in policies {
        let label = format!("{}@{}", attachment.policy, attachment.version);
        let policy = match policy {
            Ok(p) => p,
            Err(message) => {
                tally.add(Decision::Deny(format!("policy `{label}` could not be loaded: {message}")));
                evaluations.push(PolicyResult::Unloaded {
                    policy: label,
                    decision: "deny",
                    error: message.clone(),
                });
                continue;
            }
        };
        let run = sandbox.evaluate(policy, request, &attachment.config, Arc::clone(&history));
        observe(&run);
        let fault = run.outcome.as_ref().err();
        let decision = run.decision(&attachment.policy);
        evaluations.push(PolicyResult::Ran(PolicyRun {
            policy: attachment.policy.clone(),
            version: attachment.version,
            module_sha256: policy.sha256().to_owned(),
            config_sha256: hex::encode(Sha256::digest(attachment.config.as_bytes())),
            decision: decision.kind(),
            reason: decision.reason().map(str::to_owned),
            card_terms: decision.card_terms().cloned(),
            fault: fault.map(|f| FaultEntry { kind: f.kind(), detail: f.to_string() }),
            fuel_used: run.fuel_used,
            elapsed_us: u64::try_from(run.elapsed.as_micros()).unwrap_or(u64::MAX),
            logs: run.logs.clone(),
        }));
        // A fault's reason names the policy already; a policy's own reason
        // is prefixed with its name.
        tally.add(match decision {
            Decision::Deny(reason) if fault.is_none() => {
                Decision::Deny(format!("{}: {reason}", attachment.policy))
            }
            Decision::RequireApproval { reason, terms } => {
                Decision::RequireApproval { reason: format!("{}: {reason}", attachment.policy), terms }
            }
            other => other,
        });
    }
    Decided { verdict: tally.verdict(), evaluations }
}
