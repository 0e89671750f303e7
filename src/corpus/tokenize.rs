//! Prompt/choice tokenisation by lm-eval's rule (`loglikelihood` requests of HFLM).
//!
//! Trailing whitespace of the prompt moves to the front of each choice, so "Answer: " +
//! "Paris" is scored as "Answer:" + " Paris": BPE vocabularies attach the space to the
//! following word, and the model never saw a lone space token before an answer. The
//! choice's ids are those of `prompt + joint + choice` after the prompt's ids, which keeps
//! the merges the tokenizer makes across the boundary.
//!
//! The delimiter (lm-eval's `target_delimiter`, " " by default) goes in only where neither
//! side of the joint has whitespace: "Answer:" + "Paris" is scored as " Paris", never as
//! "Answer:Paris". A choice that already begins with whitespace (" Paris", the form raw HF
//! and lm-eval loglikelihood requests use) is taken as it is, and so is a prompt that ends
//! in whitespace: adding the delimiter there would make the double space (one token more,
//! one the model rarely saw) that lm-eval warns about.

use rayon::prelude::*;
use crate::tokenizer::Tokenizer;

/// One document split into prompt ids and per-choice continuation ids.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Split {
    pub prompt: Vec<u32>,
    /// Per choice: continuation ids (possibly empty: the caller decides what that means).
    pub choices: Vec<Vec<u32>>,
    /// Per choice: characters of the continuation, the joint actually used (moved
    /// whitespace or delimiter) included.
    pub chars: Vec<usize>,
}

/// Why a split failed: which choice (None: the prompt) and the tokenizer's message, or, with
/// `over` set, the tokens counted when the document passed its token budget.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SplitError {
    pub choice: Option<usize>,
    pub msg: String,
    pub over: Option<usize>,
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

/// What goes between the prompt (without its trailing whitespace) and a choice: the
/// prompt's own trailing whitespace, else the delimiter unless the choice begins with
/// whitespace, else nothing.
pub fn joint<'a>(moved: &'a str, choice: &str, delimiter: &'a str) -> &'a str {
    let choice_has_space = choice.chars().next().is_some_and(char::is_whitespace);
    if !moved.is_empty() || choice_has_space {
        moved
    } else {
        delimiter
    }
}

/// Texts longer than this are tokenised on a thread of their own while this one reports
/// progress: one call on 30 MB takes longer than the peers' liveness timeout.
const LONG_TEXT: usize = 1 << 20;

/// `tokenizer.encode`, reporting progress every second while a long text is tokenised. A
/// tokeniser cannot hang (its work is bounded by the text, which --max-line-bytes bounds), so
/// its time is progress, not a stuck rank.
fn encode(tokenizer: &Tokenizer, text: &str, specials: bool) -> Result<Vec<u32>, crate::tokenizer::TokenizerError> {
    if text.len() <= LONG_TEXT {
        return tokenizer.encode(text, specials);
    }
    std::thread::scope(|s| {
        let job = s.spawn(|| tokenizer.encode(text, specials));
        while !job.is_finished() {
            crate::liveness::advanced();
            std::thread::park_timeout(std::time::Duration::from_millis(500));
        }
        crate::liveness::advanced();
        job.join().unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

pub fn split(tokenizer: &Tokenizer, prompt: &str, choices: &[String], delimiter: &str) -> Result<Split, SplitError> {
    split_within(tokenizer, prompt, choices, delimiter, usize::MAX)
}

/// [`split`], giving up as soon as the prompt and the choices so far make more than
/// `max_tokens` tokens: each choice is tokenised after the whole prompt, so a document's
/// cost is its choices times its prompt, and the budget bounds it before it is all spent.
/// Every tokenisation reports progress: a long document must not look like a hung rank.
pub fn split_within(tokenizer: &Tokenizer, prompt: &str, choices: &[String], delimiter: &str, max_tokens: usize) -> Result<Split, SplitError> {
    let prompt_err = |e: crate::tokenizer::TokenizerError| SplitError { choice: None, msg: e.to_string(), over: None };
    let over = |choice, tokens: usize| SplitError { choice, msg: format!("more than {max_tokens} tokens"), over: Some(tokens) };
    let (context, moved) = move_whitespace(prompt);
    let with = encode(tokenizer, context, true).map_err(prompt_err)?;
    // Over the budget with its specials: not worth tokenising it again without them.
    if with.len() > max_tokens.saturating_add(2) {
        return Err(over(None, with.len()));
    }
    let plain = encode(tokenizer, context, false).map_err(prompt_err)?;
    let tail = appended_specials(&with, &plain);
    let prompt_ids = with[..with.len() - tail].to_vec();
    crate::liveness::advanced();
    let mut tokens = prompt_ids.len();
    if tokens > max_tokens {
        return Err(over(None, tokens));
    }

    let mut out = Split { prompt: prompt_ids, choices: Vec::with_capacity(choices.len()), chars: Vec::new() };
    let window = Window::find(tokenizer, context, &plain);
    // A choice's ids after the prompt (after the window where it is sound, else after the
    // whole prompt), and the characters of its joint and text.
    let ids_of = |c: usize, choice: &String| -> Result<(Vec<u32>, usize), SplitError> {
        let choice_err = |e: crate::tokenizer::TokenizerError| SplitError { choice: Some(c), msg: e.to_string(), over: None };
        let joint = joint(moved, choice, delimiter);
        let ids = match window.as_ref().map(|w| w.continuation(tokenizer, joint, choice)).transpose().map_err(choice_err)?.flatten() {
            Some(ids) => ids,
            None => {
                let whole = encode(tokenizer, &format!("{context}{joint}{choice}"), true).map_err(choice_err)?;
                let end = whole.len().saturating_sub(tail);
                whole[out.prompt.len().min(end)..end].to_vec()
            }
        };
        crate::liveness::advanced();
        Ok((ids, joint.chars().count() + choice.chars().count()))
    };
    // Chunks of choices tokenised on every thread (an extract document has thousands), the
    // budget checked after each in choice order: a chunk past it is the most spent for nothing.
    for (k, chunk) in choices.chunks(CHOICES_AT_ONCE).enumerate() {
        let c0 = k * CHOICES_AT_ONCE;
        let done: Vec<Result<(Vec<u32>, usize), SplitError>> = chunk.par_iter().enumerate().map(|(j, choice)| ids_of(c0 + j, choice)).collect();
        for (c, result) in (c0..).zip(done) {
            let (ids, chars) = result?;
            tokens += ids.len();
            if tokens > max_tokens {
                return Err(over(Some(c), tokens));
            }
            out.choices.push(ids);
            out.chars.push(chars);
        }
    }
    Ok(out)
}

/// Choices tokenised in parallel between two checks of the token budget.
const CHOICES_AT_ONCE: usize = 64;

/// Bytes of the prompt's end a choice is tokenised with, when the prompt is longer than
/// twice this: an extract document's ~17,000 candidates each tokenised after a 1500-token
/// prompt would cost minutes; after its last ~25 words, about a second.
const WINDOW_BYTES: usize = 128;

/// The prompt's end, standing in for the whole prompt when a choice is tokenised: the
/// choice's ids are those of `window + joint + choice` after the window's.
///
/// Sound where the tokenizer's work is local: a pre-tokenizer's pieces (words, with their
/// leading space) are tokenised on their own, so text far before the joint cannot change
/// the ids after it. The window starts at whitespace, before a word, and is used only if its
/// ids (but up to MAX_SKIP first ones, which a normaliser that prepends a space may change)
/// are the end of the whole prompt's; a choice whose ids change the window's before its last
/// id (which the lm-eval rule lets a choice merge with) is tokenised after the whole prompt.
struct Window<'a> {
    text: &'a str,
    /// The window's ids, without specials.
    ids: Vec<u32>,
    /// Leading ids of `ids` not found at the prompt's end.
    skip: usize,
}

const MAX_SKIP: usize = 3;

impl<'a> Window<'a> {
    /// The window of `context` (whose ids without specials are `plain`), if one is sound.
    fn find(tokenizer: &Tokenizer, context: &'a str, plain: &[u32]) -> Option<Window<'a>> {
        if context.len() <= 2 * WINDOW_BYTES {
            return None;
        }
        let mut at = context.len() - WINDOW_BYTES;
        while !context.is_char_boundary(at) {
            at -= 1;
        }
        let start = context[..at].rfind(char::is_whitespace)?;
        let text = &context[start..];
        let ids = tokenizer.encode(text, false).ok()?;
        let skip = (0..=MAX_SKIP.min(ids.len().saturating_sub(2))).find(|&k| plain.ends_with(&ids[k..]))?;
        Some(Window { text, ids, skip })
    }

    /// `choice`'s ids after the prompt, or None where the window does not stand for the
    /// whole prompt for this choice.
    fn continuation(&self, tokenizer: &Tokenizer, joint: &str, choice: &str) -> Result<Option<Vec<u32>>, crate::tokenizer::TokenizerError> {
        let whole = tokenizer.encode(&format!("{}{joint}{choice}", self.text), false)?;
        let kept = self.ids.len() - 1;
        if whole.len() < self.ids.len() || whole[self.skip..kept] != self.ids[self.skip..kept] {
            return Ok(None);
        }
        Ok(Some(whole[self.ids.len()..].to_vec()))
    }
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

    #[test]
    fn joint_follows_the_rule() {
        assert_eq!(joint("", "Paris", " "), " ");
        assert_eq!(joint("", " Paris", " "), "");
        assert_eq!(joint("", "\nParis", " "), "");
        assert_eq!(joint(" ", "Paris", " "), " ");
        assert_eq!(joint("\n", "Paris", " "), "\n");
        assert_eq!(joint(" ", " Paris", " "), " ");
        assert_eq!(joint("", "Paris", ""), "");
        assert_eq!(joint("", "Paris", "\n"), "\n");
    }

    /// A fixture's byte-level BPE (tests/fixtures/make_fixtures.py), where " EUR" and "EUR"
    /// are different tokens; llama_tied's adds <s> in front.
    fn fixture_tokenizer(name: &str) -> Tokenizer {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name).join("tokenizer.json");
        Tokenizer::from_file(&path).unwrap()
    }

    /// The continuation text the split scored, decoded from its ids.
    fn scored(tok: &Tokenizer, prompt: &str, choice: &str, delimiter: &str) -> (String, usize) {
        let s = split(tok, prompt, &[choice.to_string()], delimiter).unwrap();
        let (context, _) = move_whitespace(prompt);
        let whole = tok.encode(&format!("{context}{}{choice}", joint(move_whitespace(prompt).1, choice, delimiter)), true).unwrap();
        assert_eq!(whole, [s.prompt.clone(), s.choices[0].clone()].concat(), "the prompt ids are a prefix");
        assert_eq!(s.prompt, tok.encode(context, true).unwrap());
        (tok.decode(&s.choices[0], false).unwrap(), s.chars[0])
    }

    #[test]
    fn both_conventions_with_a_real_tokenizer() {
        for name in ["falcon_7b", "llama_tied"] {
            let tok = fixture_tokenizer(name);
            // a choice with its own leading space keeps exactly that one
            assert_eq!(scored(&tok, "The invoice currency is", " EUR", " "), (" EUR".into(), 4));
            // "Answer:" + "Paris": the delimiter goes in
            assert_eq!(scored(&tok, "Question: Which city?\nAnswer:", "Paris", " "), (" Paris".into(), 6));
            // the prompt's trailing whitespace moves to the choice, no delimiter added
            assert_eq!(scored(&tok, "Total due: ", "$120.00", " "), (" $120.00".into(), 8));
            assert_eq!(scored(&tok, "Ship to:\n", "Paris", " "), ("\nParis".into(), 6));
            assert_eq!(scored(&tok, "Answer: ", " Paris", " "), ("  Paris".into(), 7));
            // no delimiter: the choice follows the prompt directly
            assert_eq!(scored(&tok, "Answer:", "Paris", ""), ("Paris".into(), 5));
            assert_eq!(scored(&tok, "The invoice currency is", " EUR", ""), (" EUR".into(), 4));
        }
        // the space matters to this tokenizer: " EUR" is one token longer than "EUR"
        let tok = fixture_tokenizer("falcon_7b");
        let lead = split(&tok, "The invoice currency is", &[" EUR".to_string(), "EUR".to_string()], " ").unwrap();
        assert_eq!(lead.choices[0], lead.choices[1], "\"EUR\" gets the delimiter, \" EUR\" its own space");
        assert_eq!(lead.choices[0].len(), tok.encode("EUR", false).unwrap().len() + 1);
    }

    /// Each choice's ids after a long prompt's window are those after the whole prompt
    /// (the rule `scored` checks, applied here to every candidate span of a text), for
    /// every fixture family's tokenizer: candidates of a source, which tests the window on
    /// ~2,000 texts that end in words, numbers, punctuation and spaces.
    #[test]
    fn the_window_gives_the_whole_prompts_ids() {
        let text = std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bpe_text.txt")).unwrap();
        let prompt = format!("{text}\nQuestion: Which invoice is unpaid?\nAnswer:");
        let cands: Vec<String> = crate::extract::candidates(&text, 16).into_iter().map(|c| c.text).collect();
        for name in ["falcon_7b", "llama_tied", "qwen2", "llama31", "mistral"] {
            let tok = fixture_tokenizer(name);
            let (context, moved) = move_whitespace(&prompt);
            let plain = tok.encode(context, false).unwrap();
            assert!(Window::find(&tok, context, &plain).is_some(), "{name}: the window is used");
            let s = split(&tok, &prompt, &cands, " ").unwrap();
            let with = tok.encode(context, true).unwrap();
            let tail = appended_specials(&with, &plain);
            for (c, choice) in cands.iter().enumerate() {
                let whole = tok.encode(&format!("{context}{}{choice}", joint(moved, choice, " ")), true).unwrap();
                let want = &whole[with.len() - tail..whole.len() - tail];
                assert_eq!(s.choices[c], want, "{name}: {choice:?}");
            }
        }
    }
}
