//! Choice scores from per-token log-probs (docs/DESIGN.md, "Scoring semantics"). Pure.

use serde::{Deserialize, Serialize};

/// Which score picks the best choice and feeds `prob`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Norm {
    /// Sum of token log-probs (lm-eval `acc`).
    Sum,
    /// Mean per token.
    Mean,
    /// Sum per character of the continuation (lm-eval `acc_norm`).
    Char,
}

impl Norm {
    pub fn parse(s: &str) -> Option<Norm> {
        match s {
            "sum" => Some(Norm::Sum),
            "mean" => Some(Norm::Mean),
            "char" => Some(Norm::Char),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Norm::Sum => "sum",
            Norm::Mean => "mean",
            Norm::Char => "char",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChoiceScore {
    pub n_tokens: usize,
    pub logprob: f64,
    pub logprob_mean: f64,
    pub logprob_per_char: f64,
    /// Softmax over the document's choices of the `norm` score.
    pub prob: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DocScores {
    pub choices: Vec<ChoiceScore>,
    pub best: usize,
}

/// token_logprobs[c] are the log-probs of choice c's tokens; chars[c] the characters of its
/// continuation (including whitespace moved from the prompt, as lm-eval counts it).
pub fn score_document(token_logprobs: &[Vec<f64>], chars: &[usize], norm: Norm) -> DocScores {
    let mut choices: Vec<ChoiceScore> = token_logprobs
        .iter()
        .zip(chars)
        .map(|(lps, &nc)| {
            let sum: f64 = lps.iter().sum();
            ChoiceScore {
                n_tokens: lps.len(),
                logprob: sum,
                logprob_mean: sum / lps.len().max(1) as f64,
                logprob_per_char: sum / nc.max(1) as f64,
                prob: 0.0,
            }
        })
        .collect();
    let key = |c: &ChoiceScore| match norm {
        Norm::Sum => c.logprob,
        Norm::Mean => c.logprob_mean,
        Norm::Char => c.logprob_per_char,
    };
    let keys: Vec<f64> = choices.iter().map(key).collect();
    let (probs, best) = rank(&keys);
    for (c, p) in choices.iter_mut().zip(probs) {
        c.prob = p;
    }
    DocScores { choices, best }
}

/// The softmax of a document's choice scores under a norm, and the best choice (the first
/// maximum wins ties, as numpy's argmax). Also re-ranks stored scores (`show --norm`).
pub fn rank(keys: &[f64]) -> (Vec<f64>, usize) {
    let max = keys.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let z: f64 = keys.iter().map(|k| (k - max).exp()).sum();
    let probs = keys.iter().map(|k| (k - max).exp() / z).collect();
    let best = keys.iter().enumerate().fold(0, |b, (i, k)| if *k > keys[b] { i } else { b });
    (probs, best)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn norms_pick_different_choices() {
        // choice 0: one likely token; choice 1: three tokens, each less likely but long text
        let lps = vec![vec![-1.0], vec![-0.5, -0.5, -0.5]];
        let chars = vec![2, 30];
        assert_eq!(score_document(&lps, &chars, Norm::Sum).best, 0);
        assert_eq!(score_document(&lps, &chars, Norm::Mean).best, 1);
        assert_eq!(score_document(&lps, &chars, Norm::Char).best, 1);
        let s = score_document(&lps, &chars, Norm::Sum);
        assert!((s.choices[0].prob + s.choices[1].prob - 1.0).abs() < 1e-12);
        assert!((s.choices[0].prob - 1.0 / (1.0 + (-0.5f64).exp())).abs() < 1e-12);
        assert!((s.choices[1].logprob_per_char + 0.05).abs() < 1e-12);
    }
}
