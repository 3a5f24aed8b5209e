//! Human output of the daemon verbs: aligned tables, labelled lines, money
//! and masked card numbers.

use std::io::Write;

/// Width of a label column (`merchant: `), so the values line up.
const LABEL_WIDTH: usize = 10;

/// Columns between two cells of a table.
const GAP: &str = "  ";

/// Shown for a value the daemon did not send.
pub const MISSING: &str = "-";

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

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
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

/// `label:   value`, the values of consecutive lines aligned.
pub fn labelled(out: &mut dyn Write, label: &str, value: &str) -> anyhow::Result<()> {
    let label = format!("{label}:");
    writeln!(out, "{label:<LABEL_WIDTH$}{value}")?;
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
    fn long_text_is_cut_with_an_ellipsis() {
        assert_eq!(truncate("abcdef", 4), "abc…");
        assert_eq!(truncate("abcd", 4), "abcd");
    }
}
