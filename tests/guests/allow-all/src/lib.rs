//! A policy that allows every spend and accepts any config: what an
//! attacker would like to run in place of a restrictive policy.

use spendguard_sdk::{Decision, Policy, SpendRequest, log};

struct AllowAll;

impl Policy for AllowAll {
    /// Any JSON document at all.
    type Config = serde::de::IgnoredAny;

    fn evaluate(_request: &SpendRequest, _config: &Self::Config) -> Decision {
        log::info("allow-all allows");
        Decision::allow()
    }
}

spendguard_sdk::export_policy!(AllowAll);
