//! Text generation: every prompt advances one token per step in one batch, each sequence
//! keeping its keys and values in the per-layer caches (re-laid each step so a sequence's
//! rows stay contiguous and finished sequences drop out). The steps run through a
//! runner::Decoder: on this process or over the pipeline.
//!
//! Shapes: T new rows of a step, S cached rows, V vocabulary.

use crate::model::ModelError;
use crate::pipeline::PipelineError;
use crate::runner::{Decoder, StepBatch};
use crate::sample::{Sampler, SamplingOptions};
use crate::token_tree::AttnSpan;
use crate::tokenizer::{Tokenizer, TokenizerError};
use serde::{Deserialize, Serialize};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum GenerateError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error("prompt `{id}`: {msg}")]
    Prompt { id: String, msg: String },
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Finish {
    Eos,
    Length,
    Stop,
}

impl Finish {
    pub fn name(self) -> &'static str {
        match self {
            Finish::Eos => "eos",
            Finish::Length => "length",
            Finish::Stop => "stop",
        }
    }
}

#[derive(Clone, Debug)]
pub struct GenOptions {
    pub max_new_tokens: usize,
    pub sampling: SamplingOptions,
    pub stop: Vec<String>,
    /// End-of-sequence ids; empty = never stop at a token.
    pub eos: Vec<u32>,
    /// The model's context: a sequence stops with `length` when it is full.
    pub max_position: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GenOutput {
    pub id: String,
    pub prompt: String,
    pub text: String,
    /// The new token ids that `text` shows: the end-of-sequence token is left out like the
    /// stop string, and so is every token after the one the stop string begins in (that one
    /// stays when part of its text comes before the stop string).
    pub tokens: Vec<u32>,
    pub finish: Finish,
}

pub struct GenRequest {
    pub id: String,
    pub prompt: String,
    pub prompt_ids: Vec<u32>,
}

struct Seq {
    /// Rows not yet run: the prompt, then each new token.
    pending: Vec<u32>,
    history: Vec<u32>,
    new_ids: Vec<u32>,
    cache_start: usize,
    cache_len: usize,
    sampler: Sampler,
    text: String,
    finish: Option<Finish>,
}

/// Lays out one step over the active sequences and moves their cache bookkeeping forward.
fn build_step(seqs: &mut [Seq], cache_rows: usize) -> (StepBatch, Vec<usize>) {
    let mut batch = StepBatch::default();
    let mut active = vec![];
    let mut new_start = 0usize;
    let mut next_cache_pos = 0usize;
    for (i, s) in seqs.iter_mut().enumerate() {
        if s.finish.is_some() {
            continue; // its old rows are left out of cache_order, so they leave the cache
        }
        let own_start = (cache_rows + new_start) as u32;
        for (j, &t) in s.pending.iter().enumerate() {
            batch.tokens.push(t);
            batch.positions.push((s.cache_len + j) as u32);
            batch.spans.push(AttnSpan::new(s.cache_start as u32, (s.cache_start + s.cache_len) as u32, own_start));
        }
        let n = s.pending.len();
        batch.cache_order.extend((s.cache_start..s.cache_start + s.cache_len).map(|r| r as u32));
        batch.cache_order.extend((cache_rows + new_start..cache_rows + new_start + n).map(|r| r as u32));
        batch.last_rows.push((new_start + n - 1) as u32);
        s.cache_start = next_cache_pos;
        s.cache_len += n;
        next_cache_pos += s.cache_len;
        new_start += n;
        s.pending.clear();
        active.push(i);
    }
    (batch, active)
}

/// Text that is safe to show: byte-level BPE may end mid-character (decoded as U+FFFD).
fn stable_prefix(text: &str) -> &str {
    text.trim_end_matches('\u{FFFD}')
}

/// Generate for every request together. `on_text(i, delta)` receives each sequence's new text
/// as it is made (for streaming a single prompt).
pub fn generate<D: Decoder + ?Sized>(
    dec: &mut D,
    tok: &Tokenizer,
    reqs: &[GenRequest],
    opts: &GenOptions,
    mut on_text: impl FnMut(usize, &str),
) -> Result<Vec<GenOutput>, GenerateError>
where
    GenerateError: From<D::Error>,
{
    dec.reset();
    let mut seqs = vec![];
    for (i, r) in reqs.iter().enumerate() {
        if r.prompt_ids.is_empty() {
            return Err(GenerateError::Prompt { id: r.id.clone(), msg: "the prompt encodes to no tokens".into() });
        }
        if r.prompt_ids.len() >= opts.max_position {
            return Err(GenerateError::Prompt {
                id: r.id.clone(),
                msg: format!("{} prompt tokens leave no room in the model's context of {}", r.prompt_ids.len(), opts.max_position),
            });
        }
        let finish = if opts.max_new_tokens == 0 { Some(Finish::Length) } else { None };
        seqs.push(Seq {
            pending: r.prompt_ids.clone(),
            history: r.prompt_ids.clone(),
            new_ids: vec![],
            cache_start: 0,
            cache_len: 0,
            sampler: Sampler::new(&opts.sampling, i as u64),
            text: String::new(),
            finish,
        });
    }
    let mut cache_rows = 0;
    while seqs.iter().any(|s| s.finish.is_none()) {
        let (batch, active) = build_step(&mut seqs, cache_rows);
        cache_rows = batch.cache_order.len();
        let logits = dec.step(&batch)?;
        for (&i, row) in active.iter().zip(&logits) {
            let s = &mut seqs[i];
            let next = s.sampler.next(row, &s.history);
            s.history.push(next);
            if opts.eos.contains(&next) {
                s.finish = Some(Finish::Eos);
            } else {
                s.new_ids.push(next);
                let full = tok.decode(&s.new_ids, true)?;
                if let Some(cut) = opts.stop.iter().filter_map(|st| full.find(st.as_str())).min() {
                    s.finish = Some(Finish::Stop);
                    on_text(i, &full[s.text.len().min(cut)..cut]);
                    s.text = full[..cut].to_string();
                } else {
                    let shown = stable_prefix(&full);
                    if shown.len() > s.text.len() && shown.starts_with(s.text.as_str()) {
                        on_text(i, &shown[s.text.len()..]);
                        s.text = shown.to_string();
                    }
                    s.pending.push(next);
                    if s.new_ids.len() >= opts.max_new_tokens || s.cache_len + 1 >= opts.max_position {
                        s.finish = Some(Finish::Length);
                    }
                }
            }
        }
    }
    let mut out = vec![];
    for (r, mut s) in reqs.iter().zip(seqs) {
        let text = if s.finish == Some(Finish::Stop) {
            let shown = shown_tokens(tok, &s.new_ids, &s.text)?;
            s.new_ids.truncate(shown);
            s.text
        } else {
            tok.decode(&s.new_ids, true)?
        };
        out.push(GenOutput { id: r.id.clone(), prompt: r.prompt.clone(), text, tokens: s.new_ids, finish: s.finish.unwrap_or(Finish::Length) });
    }
    Ok(out)
}

/// How many of `ids` it takes to show `text` (the text before a stop string): the tokens
/// after that belong to the stop string alone.
fn shown_tokens(tok: &Tokenizer, ids: &[u32], text: &str) -> Result<usize, TokenizerError> {
    if text.is_empty() {
        return Ok(0);
    }
    // A longer prefix of the ids decodes to a longer prefix of the text, so the first k
    // that covers it is found by bisection: the answer lies in (lo, hi].
    let (mut lo, mut hi) = (0, ids.len());
    while lo + 1 < hi {
        let mid = (lo + hi) / 2;
        if tok.decode(&ids[..mid], true)?.starts_with(text) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    Ok(hi)
}
