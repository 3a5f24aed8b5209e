//! Human output of the daemon verbs: aligned tables, labelled lines, money
//! and masked card numbers.

use std::borrow::Cow;
use std::io::Write;

/// Width of a label column (`merchant: `), so the values line up.
const LABEL_WIDTH: usize = 10;

/// Columns between two cells of a table.
const GAP: &str = "  ";

/// Shown for a value the daemon did not send.
pub const MISSING: &str = "-";

/// Whether `c` must not reach a terminal as it is: a C0 or C1 control
/// (ESC starts an escape sequence, CR rewrites the line, LF forges a new
/// one, BS and DEL erase), or a character that reorders or splits the text
/// around it unseen — bidirectional marks, embeddings, overrides and
/// isolates ("Trojan Source"), and the line and paragraph separators.
pub fn is_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
                | '\u{2028}' | '\u{2029}'
        )
}

/// Text written by someone else (a policy's reasons and logs, an agent's
/// purpose and merchant, names and labels, audit records), made safe to
/// print on a terminal: every [`is_unsafe`] character is shown as its
/// escape, `\u{1b}`, so it is seen and does nothing. Everything else,
/// other scripts and emoji included, is left as it is. Every human output
/// of the CLI goes through here.
pub fn clean(text: &str) -> Cow<'_, str> {
    if !text.chars().any(is_unsafe) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if is_unsafe(c) {
            out.push_str(&c.escape_unicode().to_string());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// A JSON document made safe to print with the same value: the characters
/// of [`is_unsafe`] that JSON lets stand raw in a string (DEL, C1 controls,
/// bidirectional controls, separators) become `\uXXXX` escapes, which every
/// JSON parser reads back as the same characters. (Raw C0 controls are not
/// valid JSON in the first place; serde writes them escaped.) Outside strings
/// valid JSON holds none of these characters, so the rewrite keeps a valid
/// document valid.
pub fn json_safe(json: &str) -> Cow<'_, str> {
    if !json.chars().any(is_unsafe_in_json) {
        return Cow::Borrowed(json);
    }
    let mut out = String::with_capacity(json.len() + 8);
    for c in json.chars() {
        if is_unsafe_in_json(c) {
            // INVARIANT: every such character is in the BMP (one UTF-16 unit).
            out.push_str(&format!("\\u{:04x}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// What [`json_safe`] rewrites: JSON's own whitespace stays.
fn is_unsafe_in_json(c: char) -> bool {
    is_unsafe(c) && !matches!(c, '\n' | '\r' | '\t') && u32::from(c) <= 0xffff
}

/// A table: a header and rows, each cell padded to its column's width.
#[derive(Debug)]
pub struct Table {
    header: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&'static str]) -> Table {
        Table { header: header.to_vec(), rows: Vec::new() }
    }

    /// A row; each cell is [`clean`]ed.
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells.into_iter().map(|c| clean(&c).into_owned()).collect());
    }

    pub fn write(&self, out: &mut dyn Write) -> anyhow::Result<()> {
        let header: Vec<String> = self.header.iter().map(|h| (*h).to_owned()).collect();
        let lines = std::iter::once(&header).chain(&self.rows);
        let mut widths = vec![0; self.header.len()];
        for cells in lines.clone() {
            for (width, cell) in widths.iter_mut().zip(cells) {
                *width = (*width).max(cell.chars().count());
            }
        }
        for cells in lines {
            let mut line = String::new();
            for (i, (cell, width)) in cells.iter().zip(&widths).enumerate() {
                if i > 0 {
                    line.push_str(GAP);
                }
                line.push_str(cell);
                let pad = width - cell.chars().count();
                line.extend(std::iter::repeat_n(' ', pad));
            }
            writeln!(out, "{}", line.trim_end())?;
        }
        Ok(())
    }
}

/// `label:   value`, the values of consecutive lines aligned, the value
/// [`clean`]ed.
pub fn labelled(out: &mut dyn Write, label: &str, value: &str) -> anyhow::Result<()> {
    let label = format!("{label}:");
    writeln!(out, "{label:<LABEL_WIDTH$}{}", clean(value))?;
    Ok(())
}

/// `10.00 USD`, or what there is of it.
pub fn money(amount: Option<&str>, currency: Option<&str>) -> String {
    match (amount, currency) {
        (Some(amount), Some(currency)) => format!("{amount} {currency}"),
        (Some(amount), None) => amount.to_owned(),
        _ => MISSING.to_owned(),
    }
}

/// A card number with its middle hidden, in groups of four:
/// `4000 00•• •••• 1234`. The first six digits (the issuer's range) and the
/// last four are what a receipt shows.
pub fn masked_pan(pan: &str) -> String {
    let digits: Vec<char> = pan.chars().filter(char::is_ascii_digit).collect();
    if digits.len() < 12 {
        return "••••".to_owned();
    }
    let shown = |i: usize| i < 6 || i >= digits.len() - 4;
    let masked: Vec<char> = digits.iter().enumerate().map(|(i, d)| if shown(i) { *d } else { '•' }).collect();
    groups_of_four(&masked)
}

/// A card known only by its last four digits: `•••• •••• •••• 1234`.
pub fn masked_last4(last4: &str) -> String {
    format!("•••• •••• •••• {last4}")
}

fn groups_of_four(chars: &[char]) -> String {
    chars.chunks(4).map(|group| group.iter().collect::<String>()).collect::<Vec<_>>().join(" ")
}

/// At most `max` characters of `s`, with `…` when cut.
pub fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_owned();
    }
    let mut cut: String = s.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// `value`, or [`MISSING`] when the daemon sent none.
pub fn or_missing(value: Option<&str>) -> String {
    value.unwrap_or(MISSING).to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_on_characters_not_bytes() {
        let mut table = Table::new(&["ID", "CARD", "STATE"]);
        table.row(vec!["card_1".into(), masked_last4("1234"), "open".into()]);
        table.row(vec!["card_22".into(), "-".into(), "used".into()]);
        let mut out = Vec::new();
        table.write(&mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "ID       CARD                 STATE\n\
             card_1   •••• •••• •••• 1234  open\n\
             card_22  -                    used\n"
        );
    }

    #[test]
    fn a_pan_shows_its_range_and_last_four_only() {
        assert_eq!(masked_pan("4000001234561234"), "4000 00•• •••• 1234");
        assert_eq!(masked_pan("4000 0012 3456 1234"), "4000 00•• •••• 1234");
        assert_eq!(masked_pan("12"), "••••");
    }

    #[test]
    fn labels_line_up() {
        let mut out = Vec::new();
        labelled(&mut out, "pan", "4000001234561234").unwrap();
        labelled(&mut out, "merchant", "OpenAI").unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "pan:      4000001234561234\nmerchant: OpenAI\n");
    }

    #[test]
    fn controls_and_direction_overrides_are_shown_escaped() {
        let hostile = "\u{1b}[31mred\u{1b}[0m\r\nforged\u{202e}evil\u{2066}\u{7f}\u{9b}\t";
        let cleaned = clean(hostile);
        assert!(!cleaned.chars().any(is_unsafe), "{cleaned:?}");
        assert_eq!(
            cleaned,
            "\\u{1b}[31mred\\u{1b}[0m\\u{d}\\u{a}forged\\u{202e}evil\\u{2066}\\u{7f}\\u{9b}\\u{9}"
        );
        // Other scripts, accents and emoji are text, not threats.
        let fine = "Zoë 東京 متجر 👨\u{200d}👩\u{200d}👧";
        assert!(matches!(clean(fine), Cow::Borrowed(_)));

        let mut out = Vec::new();
        labelled(&mut out, "reason", "a\nb").unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "reason:   a\\u{a}b\n");

        // A table cell too (audit details, names, merchants), and the
        // columns still line up on what is shown.
        let mut table = Table::new(&["KIND", "DETAIL"]);
        table.row(vec!["spend".into(), "reason=\u{1b}[2J\r\u{202e}x".into()]);
        table.row(vec!["deposit".into(), "ok".into()]);
        let mut out = Vec::new();
        table.write(&mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "KIND     DETAIL\n\
             spend    reason=\\u{1b}[2J\\u{d}\\u{202e}x\n\
             deposit  ok\n"
        );
    }

    #[test]
    fn json_stays_the_same_value_without_raw_overrides() {
        let value = serde_json::json!({"reason": "\u{1b}[31m\r\n\u{202e}x\u{7f}\u{85}", "n": 1});
        let text = serde_json::to_string_pretty(&value).unwrap();
        let safe = json_safe(&text);
        assert!(!safe.chars().any(|c| is_unsafe(c) && c != '\n'), "{safe}");
        assert!(safe.contains("\\u202e"), "{safe}");
        assert_eq!(serde_json::from_str::<serde_json::Value>(&safe).unwrap(), value);
    }

    #[test]
    fn long_text_is_cut_with_an_ellipsis() {
        assert_eq!(truncate("abcdef", 4), "abc…");
        assert_eq!(truncate("abcd", 4), "abcd");
    }
}
