//! The corpus: JSONL documents read line by line, validated, tokenized and packed.
//!
//! Every line becomes a [`PreparedDoc`]; a bad line is a failed document with a message
//! naming the file, line and field, never a fatal error, because one malformed record in
//! a 100k-document monthly batch must not cost the other 99,999. Only an unreadable file
//! (or a bad template) stops the run, and it does so before any work.

mod input_hash;
mod line;
mod pack;
mod scan;
mod spool;
mod template;
mod tokenize;

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

use thiserror::Error;

use crate::token_tree::TokenizedDoc;
use crate::tokenizer::Tokenizer;

pub use input_hash::{document_hash, raw_line_hash, FileHasher, INPUT_HASH_LEN};
pub use line::{is_line_id, line_id};
pub use scan::{scan, Scan, ScannedDoc};
pub use pack::{build_batch, pack, split_choices, Batcher};
pub use spool::{reads_once, spool, Spooled};
pub use template::{Template, DEFAULT_TEMPLATE};
pub use tokenize::{joint, move_whitespace, split, split_within, Split, SplitError};

#[derive(Debug, Error)]
pub enum CorpusError {
    #[error("{path}: cannot read: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{origin}: bad prompt template: {msg}")]
    Template { origin: String, msg: String },
}

/// A document that passed every check, ready to be packed and scored.
#[derive(Clone, Debug, PartialEq)]
pub struct ReadyDoc {
    pub doc: TokenizedDoc,
    /// Choice texts as given in the corpus (without the moved whitespace).
    pub choices: Vec<String>,
    /// Per choice, characters of its continuation (moved whitespace or delimiter included), for
    /// `score::score_document`.
    pub choice_chars: Vec<usize>,
    pub n_prompt_tokens: usize,
    /// The corpus's "answer" field when it is a string (used only for demo accuracy).
    pub answer: Option<String>,
    /// What determines its scores (see [`document_hash`]), recorded with them.
    pub input_hash: String,
    /// [`DocForm::Source`]: per choice (a candidate span), its start and end in the source,
    /// in code points, end exclusive; empty for given choices.
    pub spans: Vec<(usize, usize)>,
}

impl ReadyDoc {
    /// Index of the choice equal to `answer`, if any.
    pub fn answer_index(&self) -> Option<usize> {
        let answer = self.answer.as_deref()?;
        self.choices.iter().position(|c| c == answer)
    }
}

/// One non-blank line of the corpus.
#[derive(Clone, Debug, PartialEq)]
pub struct PreparedDoc {
    /// Input order among non-blank lines (stable across resumed runs).
    pub index: usize,
    /// 1-based line number in the file.
    pub line: usize,
    /// The document's id, or `line:N` when it could not be read or was a duplicate.
    pub id: String,
    /// [`document_hash`] of its prompt and choices, or [`raw_line_hash`] of a line that has none.
    pub input_hash: String,
    /// The ready document, or a message `file:line: field ...: what was expected`.
    pub result: Result<ReadyDoc, String>,
}

#[derive(Clone, Debug)]
pub struct CorpusOptions {
    pub template: Template,
    /// Longest context the model takes; a document needing more positions fails.
    pub max_context: usize,
    /// Put between the prompt and a choice where neither side of the joint has whitespace
    /// (lm-eval's `target_delimiter`); " " unless the language writes without spaces.
    pub delimiter: String,
    /// Ids already in the results file (resume): parsed for duplicate detection, but
    /// neither tokenized nor yielded.
    pub skip_ids: HashSet<String>,
    /// Per-document limits, checked before the work they bound (see [`Limits`]).
    pub limits: Limits,
    /// Where a document's choices come from.
    pub form: DocForm,
}

/// Where a document's choices come from: its "choices" field (score), or every span of its
/// source (extract: "source" beside "prompt", else "text").
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum DocForm {
    #[default]
    Choices,
    /// The candidates of `extract::candidates` up to `max_units` units, each to be followed
    /// by the `end` ids (which count toward the context a document needs).
    Source { max_units: usize, end: Vec<u32> },
}

impl CorpusOptions {
    pub fn new(template: Template, max_context: usize) -> CorpusOptions {
        CorpusOptions { template, max_context, delimiter: " ".to_string(), skip_ids: HashSet::new(), limits: Limits::default(), form: DocForm::Choices }
    }
}

/// Cheap bounds checked before expensive work, so that no single document can take the job
/// down (a 30 MB line once starved every rank's liveness check while it was tokenised, on
/// every rerun): a document over one fails alone, with a message naming the limit's option.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of one line (`--max-line-bytes`), checked while reading it, before JSON.
    pub line_bytes: usize,
    /// Choices of one document (`--max-choices`), checked before tokenising.
    pub choices: usize,
    /// Tokens of one document, its prompt and every choice (`--max-doc-tokens`), checked
    /// while tokenising.
    pub doc_tokens: usize,
}

impl Limits {
    /// Far above any real document: 4 MiB covers a 128k-token context.
    pub const DEFAULT_LINE_BYTES: usize = 4 << 20;
    pub const DEFAULT_CHOICES: usize = 1024;
    pub const DEFAULT_DOC_TOKENS: usize = 1 << 16;
}

impl Default for Limits {
    fn default() -> Limits {
        Limits { line_bytes: Limits::DEFAULT_LINE_BYTES, choices: Limits::DEFAULT_CHOICES, doc_tokens: Limits::DEFAULT_DOC_TOKENS }
    }
}

/// Counts so far; final once the reader is exhausted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CorpusStats {
    pub blank: usize,
    pub skipped: usize,
    pub ok: usize,
    pub failed: usize,
}

/// Open the corpus file, or say why it cannot be read (missing, unreadable, a directory).
pub fn open_corpus(path: &Path) -> Result<File, CorpusError> {
    let name = path.display().to_string();
    let file = File::open(path).map_err(|source| CorpusError::Io { path: name.clone(), source })?;
    // Opening a directory succeeds on Unix; reading it fails. Catch it before any work.
    match file.metadata() {
        Ok(m) if m.is_dir() => Err(CorpusError::Io { path: name, source: std::io::Error::other("is a directory, expected a JSONL file") }),
        Err(source) => Err(CorpusError::Io { path: name, source }),
        Ok(_) => Ok(file),
    }
}

/// Streaming reader: one [`PreparedDoc`] per non-blank line not in `skip_ids`, read on
/// demand so a large corpus is never held in memory.
pub struct CorpusReader<'t> {
    name: String,
    input: Box<dyn BufRead + Send + 't>,
    tokenizer: &'t Tokenizer,
    options: CorpusOptions,
    seen: line::SeenIds,
    buf: Vec<u8>,
    line_no: usize,
    index: usize,
    stats: CorpusStats,
    finished: bool,
}

impl<'t> CorpusReader<'t> {
    /// Open the corpus file; a missing or unreadable file is an error here, before any
    /// document is read.
    pub fn open(path: &Path, tokenizer: &'t Tokenizer, options: CorpusOptions) -> Result<CorpusReader<'t>, CorpusError> {
        let name = path.display().to_string();
        let file = open_corpus(path)?;
        Ok(CorpusReader::from_reader(&name, BufReader::with_capacity(1 << 20, file), tokenizer, options))
    }

    /// Read from any buffered source; `name` stands for the file in messages.
    pub fn from_reader(
        name: &str,
        input: impl BufRead + Send + 't,
        tokenizer: &'t Tokenizer,
        options: CorpusOptions,
    ) -> CorpusReader<'t> {
        CorpusReader {
            name: name.to_string(),
            input: Box::new(input),
            tokenizer,
            options,
            seen: line::SeenIds::default(),
            buf: Vec::new(),
            line_no: 0,
            index: 0,
            stats: CorpusStats::default(),
            finished: false,
        }
    }

    pub fn stats(&self) -> CorpusStats {
        self.stats
    }
}

impl Iterator for CorpusReader<'_> {
    type Item = Result<PreparedDoc, CorpusError>;

    fn next(&mut self) -> Option<Self::Item> {
        while !self.finished {
            self.buf.clear();
            match read_line_capped(&mut self.input, &mut self.buf, self.options.limits.line_bytes, |_| {}) {
                Ok(0) => self.finished = true,
                Ok(n) if line_len(n, &self.buf) > self.options.limits.line_bytes => {
                    self.line_no += 1;
                    let index = self.index;
                    self.index += 1;
                    let ctx = line::LineCtx { file: &self.name, line: self.line_no, index, tokenizer: self.tokenizer, options: &self.options };
                    match line::too_long(&ctx, line_len(n, &self.buf)) {
                        None => self.stats.skipped += 1,
                        Some(doc) => {
                            self.stats.failed += 1;
                            return Some(Ok(doc));
                        }
                    }
                }
                Ok(_) => {
                    self.line_no += 1;
                    let Some(bytes) = line_content(self.line_no, &self.buf) else {
                        self.stats.blank += 1;
                        continue;
                    };
                    let index = self.index;
                    self.index += 1;
                    let ctx = line::LineCtx {
                        file: &self.name,
                        line: self.line_no,
                        index,
                        tokenizer: self.tokenizer,
                        options: &self.options,
                    };
                    match line::prepare(&ctx, bytes, &mut self.seen) {
                        None => self.stats.skipped += 1,
                        Some(doc) => {
                            match doc.result {
                                Ok(_) => self.stats.ok += 1,
                                Err(_) => self.stats.failed += 1,
                            }
                            return Some(Ok(doc));
                        }
                    }
                }
                Err(source) => {
                    self.finished = true;
                    return Some(Err(CorpusError::Io { path: format!("{}:{}", self.name, self.line_no + 1), source }));
                }
            }
        }
        None
    }
}

/// A line's document bytes: without the first line's byte-order mark; None for a blank line.
fn line_content(line_no: usize, buf: &[u8]) -> Option<&[u8]> {
    let bytes = if line_no == 1 { buf.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(buf) } else { buf };
    (!bytes.iter().all(u8::is_ascii_whitespace)).then_some(bytes)
}

/// Read one line into `buf` (its newline included) and return its length in bytes, keeping
/// at most `cap` + 2 of them: the rest of a longer line is read past, never held. `seen`
/// gets every byte read, kept or not (the corpus scan hashes the whole file).
fn read_line_capped(input: &mut dyn BufRead, buf: &mut Vec<u8>, cap: usize, mut seen: impl FnMut(&[u8])) -> std::io::Result<usize> {
    let keep = cap.saturating_add(2);
    let mut total = 0;
    loop {
        let chunk = match input.fill_buf() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if chunk.is_empty() {
            return Ok(total);
        }
        let (take, end) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (chunk.len(), false),
        };
        let room = keep.saturating_sub(buf.len()).min(take);
        buf.extend_from_slice(&chunk[..room]);
        seen(&chunk[..take]);
        input.consume(take);
        total += take;
        if end {
            return Ok(total);
        }
        // Reading a long line is work moving on, not a hung rank.
        crate::liveness::advanced();
    }
}

/// Bytes of a line of `n` bytes without its line ending (`buf` holds its kept start).
fn line_len(n: usize, buf: &[u8]) -> usize {
    if n == buf.len() {
        let b = buf.strip_suffix(b"\n").unwrap_or(buf);
        b.strip_suffix(b"\r").unwrap_or(b).len()
    } else {
        // Cut short: the line ending, if any, was not kept, and the line is over the cap anyway.
        n.saturating_sub(1)
    }
}

/// Read the whole corpus at once (small corpora, tests, `plan`).
pub fn read_all(path: &Path, tokenizer: &Tokenizer, options: CorpusOptions) -> Result<Vec<PreparedDoc>, CorpusError> {
    CorpusReader::open(path, tokenizer, options)?.collect()
}
