//! A component whose exports carry the policy names with other types: the
//! host must refuse it at load, not fail at the first evaluation.

wit_bindgen::generate!({
    inline: "
        package spendguard:hostile;
        world wrong {
            export validate-config: func(config: string) -> result<_, string>;
            export evaluate: func(amount: u32) -> bool;
        }
    ",
});

struct Wrong;

impl Guest for Wrong {
    fn validate_config(_: String) -> Result<(), String> {
        Ok(())
    }

    fn evaluate(amount: u32) -> bool {
        amount < 100
    }
}

export!(Wrong);
