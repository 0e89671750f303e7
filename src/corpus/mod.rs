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
pub use pack::{build_batch, pack, Batcher};
pub use scan::{scan, Scan, ScannedDoc};
pub use template::{Template, DEFAULT_TEMPLATE};
pub use tokenize::{joint, move_whitespace, split, Split, SplitError};

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
}

impl CorpusOptions {
    pub fn new(template: Template, max_context: usize) -> CorpusOptions {
        CorpusOptions { template, max_context, delimiter: " ".to_string(), skip_ids: HashSet::new() }
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
            match self.input.read_until(b'\n', &mut self.buf) {
                Ok(0) => self.finished = true,
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

/// Read the whole corpus at once (small corpora, tests, `plan`).
pub fn read_all(path: &Path, tokenizer: &Tokenizer, options: CorpusOptions) -> Result<Vec<PreparedDoc>, CorpusError> {
    CorpusReader::open(path, tokenizer, options)?.collect()
}
