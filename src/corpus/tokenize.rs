//! Prompt/choice tokenisation by lm-eval's rule (`loglikelihood` requests of HFLM).
//!
//! Trailing whitespace of the prompt moves to the front of each choice, so "Answer: " +
//! "Paris" is scored as "Answer:" + " Paris": BPE vocabularies attach the space to the
//! following word, and the model never saw a lone space token before an answer. The
//! choice's ids are those of `prompt + choice` after the prompt's ids, which keeps the
//! merges the tokenizer makes across the boundary.
//!
//! When the prompt ends without whitespace (the default template ends in "Answer:"), the
//! choice is joined with a delimiter, lm-eval's `target_delimiter` (" " by default), so
//! "Answer:" + "Paris" is scored as " Paris", never as "Answer:Paris". A prompt that
//! already ends in whitespace gets no delimiter: its whitespace is the delimiter, and
//! adding one would make the double space lm-eval warns about.

use crate::tokenizer::Tokenizer;

/// One document split into prompt ids and per-choice continuation ids.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Split {
    pub prompt: Vec<u32>,
    /// Per choice: continuation ids (possibly empty: the caller decides what that means).
    pub choices: Vec<Vec<u32>>,
    /// Per choice: characters of the continuation including the moved whitespace.
    pub chars: Vec<usize>,
}

/// Why a split failed: which choice (None: the prompt) and the tokenizer's message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SplitError {
    pub choice: Option<usize>,
    pub msg: String,
}

/// The prompt without trailing whitespace, and that whitespace.
pub fn move_whitespace(prompt: &str) -> (&str, &str) {
    let kept = prompt.trim_end();
    (kept, &prompt[kept.len()..])
}

/// How many special tokens the post-processor appends after the text (e.g. an EOS).
///
/// Found by locating the plain encoding inside the special one: whatever follows it was
/// appended. lm-eval's rule assumes specials only at the front; appended ones would sit
/// between prompt and choice, so they are dropped from both (the model must score the
/// choice right after the prompt, not after an end-of-text token).
fn appended_specials(with: &[u32], plain: &[u32]) -> usize {
    if plain.is_empty() || plain.len() > with.len() {
        return 0;
    }
    (0..=with.len() - plain.len())
        .find(|&start| with[start..start + plain.len()] == *plain)
        .map_or(0, |start| with.len() - start - plain.len())
}

pub fn split(tokenizer: &Tokenizer, prompt: &str, choices: &[String], delimiter: &str) -> Result<Split, SplitError> {
    let prompt_err = |e: crate::tokenizer::TokenizerError| SplitError { choice: None, msg: e.to_string() };
    let (context, moved) = move_whitespace(prompt);
    let moved = if moved.is_empty() { delimiter } else { moved };
    let with = tokenizer.encode(context, true).map_err(prompt_err)?;
    let plain = tokenizer.encode(context, false).map_err(prompt_err)?;
    let tail = appended_specials(&with, &plain);
    let prompt_ids = with[..with.len() - tail].to_vec();

    let mut out = Split { prompt: prompt_ids, choices: Vec::with_capacity(choices.len()), chars: Vec::new() };
    let mut whole_text = String::with_capacity(context.len() + 64);
    for (c, choice) in choices.iter().enumerate() {
        whole_text.clear();
        whole_text.push_str(context);
        whole_text.push_str(moved);
        whole_text.push_str(choice);
        let whole = tokenizer
            .encode(&whole_text, true)
            .map_err(|e| SplitError { choice: Some(c), msg: e.to_string() })?;
        let end = whole.len().saturating_sub(tail);
        let start = out.prompt.len().min(end);
        out.choices.push(whole[start..end].to_vec());
        out.chars.push(moved.chars().count() + choice.chars().count());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whitespace_moves() {
        assert_eq!(move_whitespace("Answer: \n"), ("Answer:", " \n"));
        assert_eq!(move_whitespace("Answer:"), ("Answer:", ""));
        assert_eq!(move_whitespace("Réponse :\u{a0}"), ("Réponse :", "\u{a0}"));
    }

    #[test]
    fn appended_specials_found() {
        assert_eq!(appended_specials(&[1, 5, 6], &[5, 6]), 0);
        assert_eq!(appended_specials(&[5, 6, 2], &[5, 6]), 1);
        assert_eq!(appended_specials(&[1, 5, 6, 2, 3], &[5, 6]), 2);
        assert_eq!(appended_specials(&[1], &[]), 0);
    }
}
