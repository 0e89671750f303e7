//! The units of a source text: the regex `\w+|[^\w\s]` with Unicode classes (a run of word
//! characters, or one character that is neither a word character nor whitespace). The same
//! pattern in Python's `re` on a str gives the same units: both take `\w` as Unicode
//! alphanumerics, marks, connector punctuation and the joiners, and `\s` as Unicode
//! whitespace.

use regex::Regex;
use std::sync::OnceLock;

fn pattern() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    // A fixed, valid pattern: compiling it cannot fail.
    RE.get_or_init(|| Regex::new(r"\w+|[^\w\s]").expect("the units pattern compiles"))
}

/// Byte ranges of the units of `source`, in order.
pub fn units(source: &str) -> Vec<std::ops::Range<usize>> {
    pattern().find_iter(source).map(|m| m.range()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(s: &str) -> Vec<&str> {
        units(s).into_iter().map(|r| &s[r]).collect()
    }

    #[test]
    fn words_and_single_punctuation() {
        assert_eq!(texts("Total: $1,200.50 due"), ["Total", ":", "$", "1", ",", "200", ".", "50", "due"]);
        assert_eq!(texts("  café_au-lait\n"), ["café_au", "-", "lait"]);
        assert_eq!(texts("Зуб 東京!!"), ["Зуб", "東京", "!", "!"]);
        assert!(texts(" \t\n").is_empty());
    }
}
