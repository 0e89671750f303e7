//! SQuAD v1.1's answer comparison (its evaluate script): exact match and token F1 after
//! normalising both texts: lowercase, ASCII punctuation removed, the articles a/an/the
//! dropped, whitespace collapsed.

use regex::Regex;
use std::collections::HashMap;
use std::sync::OnceLock;

pub fn normalize(s: &str) -> String {
    static ARTICLES: OnceLock<Regex> = OnceLock::new();
    // A fixed, valid pattern: compiling it cannot fail.
    let articles = ARTICLES.get_or_init(|| Regex::new(r"\b(a|an|the)\b").expect("the articles pattern compiles"));
    let lower = s.to_lowercase();
    let no_punct: String = lower.chars().filter(|c| !c.is_ascii_punctuation()).collect();
    let no_articles = articles.replace_all(&no_punct, " ");
    no_articles.split_whitespace().collect::<Vec<_>>().join(" ")
}

pub fn exact_match(prediction: &str, answer: &str) -> bool {
    normalize(prediction) == normalize(answer)
}

/// Token F1 of the normalised texts (0 when they share no token, as SQuAD v1.1).
pub fn token_f1(prediction: &str, answer: &str) -> f64 {
    let (p, a) = (normalize(prediction), normalize(answer));
    let (p, a): (Vec<&str>, Vec<&str>) = (p.split_whitespace().collect(), a.split_whitespace().collect());
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for t in &a {
        *counts.entry(t).or_default() += 1;
    }
    let mut same = 0;
    for t in &p {
        if let Some(n) = counts.get_mut(t).filter(|n| **n > 0) {
            *n -= 1;
            same += 1;
        }
    }
    if same == 0 {
        return 0.0;
    }
    let (precision, recall) = (same as f64 / p.len() as f64, same as f64 / a.len() as f64);
    2.0 * precision * recall / (precision + recall)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn squad_normalisation() {
        assert_eq!(normalize("The  Eiffel-Tower, an icon!"), "eiffeltower icon");
        assert!(exact_match("the EUR.", "EUR"));
        assert!(!exact_match("EUR 12", "EUR"));
        assert!((token_f1("EUR 12", "EUR") - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(token_f1("a", "the"), 0.0);
        assert!((token_f1("paris paris france", "paris") - 0.5).abs() < 1e-12);
    }
}
