#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

mod arena;
#[doc(hidden)]
pub mod bindings;
mod decision;
pub mod history;
pub mod log;
mod request;
pub mod testing;

pub use decision::{CardTerms, Decision};
pub use history::{SpendFilter, SpendSummary};
pub use request::{Agent, Mandate, Merchant, Money, SpendRequest};
pub use rust_decimal::{Decimal, RoundingStrategy};
pub use serde;
/// The shapes of a merchant category code, a country and a currency code, as
/// the daemon checks them: check a config's codes with these.
pub use spendguard_types as types;

// The generated bindings name the SDK by its crate name, also from inside it.
extern crate self as spendguard_sdk;

/// A spend policy: the code that decides on one proposed spend.
///
/// Implement it on a unit struct and register that struct with
/// [`export_policy!`]. Both functions are associated functions, not methods:
/// every evaluation runs in a fresh sandbox, so a policy has no state between
/// two calls and must not expect any.
pub trait Policy {
    /// The JSON document the operator attaches with the policy, deserialized
    /// with serde. Use [`NoConfig`] for a policy that takes none.
    /// `#[serde(deny_unknown_fields)]` is recommended so a typo in a config is
    /// refused when it is attached instead of silently ignored.
    type Config: serde::de::DeserializeOwned;

    /// Checks beyond the config's shape (a positive limit, a known currency).
    /// Runs when the operator attaches the policy, and before each evaluation.
    /// Return a message the operator can act on.
    fn check_config(config: &Self::Config) -> Result<(), String> {
        let _ = config;
        Ok(())
    }

    /// Decide on one proposed spend.
    fn evaluate(request: &SpendRequest, config: &Self::Config) -> Decision;
}

/// The config of a policy that takes none: accepts `{}` (and `null`), refuses
/// any field.
#[derive(Debug, Clone, Copy, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoConfig {}

/// Registers a [`Policy`] as the module's `validate-config` and `evaluate`
/// exports. Use it once per policy crate, at the top level:
///
/// ```ignore
/// spendguard_sdk::export_policy!(MyPolicy);
/// ```
#[macro_export]
macro_rules! export_policy {
    ($policy:ty) => {
        const _: () = {
            struct SpendguardPolicyExports;
            impl $crate::__private::bindings::Guest for SpendguardPolicyExports {
                fn validate_config(
                    config: ::std::string::String,
                ) -> ::std::result::Result<(), ::std::string::String> {
                    $crate::__private::bindings::validate_config_wit::<$policy>(config)
                }
                fn evaluate(
                    request: $crate::__private::bindings::wit::SpendRequest,
                    config: ::std::string::String,
                ) -> $crate::__private::bindings::wit::Decision {
                    $crate::__private::bindings::evaluate_wit::<$policy>(request, config)
                }
            }
            $crate::__private::bindings::__export_spend_policy!(
                SpendguardPolicyExports with_types_in $crate::__private::bindings
            );
        };
    };
}

/// Not part of the public API: what [`export_policy!`] expands to needs these.
#[doc(hidden)]
pub mod __private {
    pub use crate::bindings;
    pub use wit_bindgen;
}
