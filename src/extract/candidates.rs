//! A source's candidate spans: the text from the start of unit i to the end of unit j, for
//! j - i < max_units, taken verbatim (inner whitespace kept). Spans of the same text are
//! one candidate, at its first occurrence: the smallest start, then the smallest end.

use super::units::units;
use std::collections::HashSet;

/// One distinct span of the source; offsets in Unicode code points, end exclusive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub text: String,
    pub start: usize,
    pub end: usize,
}

/// Every distinct candidate of `source`, in order of first occurrence (start, then end).
pub fn candidates(source: &str, max_units: usize) -> Vec<Candidate> {
    let spans = units(source);
    // Byte offset -> code points before it, for the unit boundaries only.
    let mut chars_before = std::collections::HashMap::with_capacity(2 * spans.len());
    let (mut byte, mut count) = (0usize, 0usize);
    let mut boundaries: Vec<usize> = spans.iter().flat_map(|r| [r.start, r.end]).collect();
    boundaries.sort_unstable();
    boundaries.dedup();
    for b in boundaries {
        count += source[byte..b].chars().count();
        byte = b;
        chars_before.insert(b, count);
    }
    let mut seen: HashSet<&str> = HashSet::new();
    let mut out = vec![];
    for i in 0..spans.len() {
        for j in i..spans.len().min(i + max_units) {
            let text = &source[spans[i].start..spans[j].end];
            if seen.insert(text) {
                out.push(Candidate { text: text.to_string(), start: chars_before[&spans[i].start], end: chars_before[&spans[j].end] });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_up_to_the_unit_limit_first_occurrence_kept() {
        let c = candidates("a b, a b", 2);
        let got: Vec<(&str, usize, usize)> = c.iter().map(|c| (c.text.as_str(), c.start, c.end)).collect();
        assert_eq!(got, [("a", 0, 1), ("a b", 0, 3), ("b", 2, 3), ("b,", 2, 4), (",", 3, 4), (", a", 3, 6)]);
    }

    #[test]
    fn offsets_are_code_points_and_inner_whitespace_is_kept() {
        let src = "né  à\tÉté!";
        let c = candidates(src, 16);
        let whole = c.iter().find(|c| c.text == "né  à\tÉté!").unwrap();
        assert_eq!((whole.start, whole.end), (0, 10));
        let ete = c.iter().find(|c| c.text == "Été").unwrap();
        assert_eq!((ete.start, ete.end), (6, 9));
        let chars: Vec<char> = src.chars().collect();
        for c in &c {
            assert_eq!(chars[c.start..c.end].iter().collect::<String>(), c.text);
        }
    }

    #[test]
    fn count_is_bounded_by_units_times_limit() {
        let src = (0..100).map(|i| format!("w{i}")).collect::<Vec<_>>().join(" ");
        assert_eq!(candidates(&src, 16).len(), (0..100).map(|i: usize| (100 - i).min(16)).sum::<usize>());
    }
}
