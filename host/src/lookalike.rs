//! Text that looks like other text: Unicode's security mechanisms (UTS #39)
//! applied where a person must tell one merchant from another.
//!
//! A merchant id is what a card is locked to and what an approver reads to
//! know where the money goes. An id that *looks* like another merchant's
//! (`аpi.openai.com` with a Cyrillic `а`, `api．openai．com` with full-width
//! dots) would be shown to the approver as if it were genuine. So a merchant
//! id is accepted only when it is one of:
//!
//! - plain ASCII (what acquirers' merchant ids and domain names are; an
//!   internationalized domain is sent as its punycode A-label, `xn--…`);
//! - otherwise, all of: stable under NFKC (no full-width or styled forms, no
//!   ligatures, no decomposed accents); written in a single script, or in
//!   one of the combinations Unicode's "highly restrictive" level allows
//!   (Latin with Han and Kana, with Han and Bopomofo, with Han and Hangul);
//!   and not confusable with a Latin one: its UTS #39 skeleton is not plain
//!   ASCII, and an id in another script does not look all Latin — so no id
//!   made of lookalike letters stands for an ASCII one.
//!
//! Names (a merchant's display name, agent names, labels, purposes) are free
//! text: a shop may well be called "Café 東京". They are not refused; a name
//! mixing scripts is flagged where a person decides on it ([`mixed_scripts`]).

use std::collections::BTreeSet;
use std::fmt;

use unicode_security::mixed_script::AugmentedScriptSet;
use unicode_security::{MixedScript, RestrictionLevel, RestrictionLevelDetection, skeleton};

/// Why a merchant id was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookalike {
    /// Not stable under NFKC: a compatibility form (full-width, styled,
    /// ligature) or a decomposed character.
    NotNormalized,
    /// Letters of several scripts, beyond what UTS #39's "highly
    /// restrictive" level allows. The scripts, by name.
    MixedScripts(Vec<String>),
    /// Made of letters that look like those of a plain ASCII or Latin id.
    ConfusableWithLatin,
}

impl fmt::Display for Lookalike {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Lookalike::NotNormalized => f.write_str(
                "has full-width, styled or decomposed characters (it is not in Unicode normal form NFKC), \
                 which make it look like another id",
            ),
            Lookalike::MixedScripts(scripts) => {
                write!(
                    f,
                    "mixes the scripts {}, as a lookalike of another merchant's id does",
                    scripts.join(", ")
                )
            }
            Lookalike::ConfusableWithLatin => f.write_str(
                "is made of letters that look like plain Latin ones, as a lookalike of an ASCII id is",
            ),
        }
    }
}

/// What to send instead of a refused merchant id.
pub const INSTEAD: &str =
    "send the merchant's id in ASCII (an internationalized domain as its punycode A-label, `xn--…`)";

/// Check a merchant id (see the module's documentation for the rule).
pub fn check_merchant_id(id: &str) -> Result<(), Lookalike> {
    if id.is_ascii() {
        return Ok(());
    }
    if !unicode_normalization::is_nfkc(id) {
        return Err(Lookalike::NotNormalized);
    }
    let scripts_fit =
        id.is_single_script() || id.detect_restriction_level() <= RestrictionLevel::HighlyRestrictive;
    if !scripts_fit {
        return Err(Lookalike::MixedScripts(scripts(id)));
    }
    // Its skeleton (what it looks like, by UTS #39's confusables) is plain
    // ASCII (`ɑpi.openai.com`, Latin alpha), or it is written in another
    // script and looks all Latin (`раураӏ.сом`, every letter Cyrillic).
    let looks: String = skeleton(id).collect();
    if looks.is_ascii() || (!could_be_latin(id) && could_be_latin(&looks)) {
        return Err(Lookalike::ConfusableWithLatin);
    }
    Ok(())
}

/// Whether `text`'s resolved script set holds Latin (characters common to
/// every script, digits and punctuation, count as Latin too).
fn could_be_latin(text: &str) -> bool {
    let mut set = AugmentedScriptSet::for_str(text);
    set.intersect_with(AugmentedScriptSet::for_char('a'));
    !set.is_empty()
}

/// The scripts mixed within one word of `text`, by name (`["Cyrillic",
/// "Latin"]`), or `None` when each word is in one script (characters common
/// to all scripts, digits and punctuation, count for any). A name may well
/// put words of several scripts side by side ("Café 東京"); one word mixing
/// them (`Оpenai`, its `О` Cyrillic) is how a name imitates another. For
/// flagging names to the people who read them.
pub fn mixed_scripts(text: &str) -> Option<Vec<String>> {
    let mixed: Vec<&str> =
        text.split(|c: char| !c.is_alphanumeric()).filter(|word| !word.is_single_script()).collect();
    if mixed.is_empty() {
        return None;
    }
    Some(scripts(&mixed.concat()))
}

/// The script sets of a text's letters, each named once, in order.
fn scripts(text: &str) -> Vec<String> {
    let mut seen = BTreeSet::new();
    let mut names = Vec::new();
    for c in text.chars() {
        let set = AugmentedScriptSet::for_char(c);
        if set.is_all() || set.is_empty() {
            continue;
        }
        let name = set.to_string();
        if seen.insert(name.clone()) {
            names.push(name);
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ascii_ids_pass() {
        for id in ["api.openai.com", "MID-000123", "xn--pi-7kc.openai.com", "a", "paypa1.com"] {
            assert_eq!(check_merchant_id(id), Ok(()), "{id}");
        }
    }

    #[test]
    fn lookalikes_are_refused() {
        // A Cyrillic `а` among Latin letters.
        assert!(
            matches!(check_merchant_id("\u{430}pi.openai.com"), Err(Lookalike::MixedScripts(s)) if s == ["Cyrillic", "Latin"])
        );
        // Full-width dots, full-width letters, a ligature, decomposed accents.
        for id in
            ["api\u{ff0e}openai\u{ff0e}com", "\u{ff41}pi.openai.com", "\u{fb01}nance.com", "bu\u{308}cher.de"]
        {
            assert_eq!(check_merchant_id(id), Err(Lookalike::NotNormalized), "{id:?}");
        }
        // Every letter Cyrillic, and the whole looks like `paypal.com`...
        for id in [
            "\u{440}\u{430}\u{443}\u{440}\u{430}\u{4cf}.\u{441}\u{43e}\u{43c}",
            "\u{455}\u{441}\u{43e}\u{440}\u{435}.\u{441}\u{43e}",
        ] {
            assert_eq!(check_merchant_id(id), Err(Lookalike::ConfusableWithLatin), "{id}");
        }
        // ...or Latin, but not ASCII: a Latin alpha, a dotless i.
        for id in ["\u{251}pi.openai.com", "payp\u{251}l.com", "pa\u{131}d.com"] {
            assert_eq!(check_merchant_id(id), Err(Lookalike::ConfusableWithLatin), "{id}");
        }
        // ...or Greek letters that read as Latin ones.
        assert!(check_merchant_id("\u{3bf}\u{3bf}.com").is_err());
        assert!(
            Lookalike::MixedScripts(vec!["Cyrillic".into(), "Latin".into()])
                .to_string()
                .contains("Cyrillic, Latin")
        );
    }

    #[test]
    fn international_ids_that_look_like_no_other_pass() {
        for id in [
            "bücher.de",
            "пример.рф",
            "東京ストア.jp",
            "例え.テスト",
            "example.com\u{1f600}",
            "münchen-café.de",
            "ελληνικά.ελ",
        ] {
            assert_eq!(check_merchant_id(id), Ok(()), "{id}");
        }
    }

    #[test]
    fn names_mixing_scripts_are_flagged_not_refused() {
        assert_eq!(mixed_scripts("OpenAI"), None);
        assert_eq!(mixed_scripts("Café 42 😀"), None);
        assert_eq!(mixed_scripts("Café 東京 متجر"), None);
        assert_eq!(mixed_scripts("Ореn\u{430}I"), Some(vec!["Cyrillic".to_owned(), "Latin".to_owned()]));
    }
}
