//! One pass over the corpus without tokenizing: each line's id and input hash, and the
//! file's hash. A resumed run plans from it before any weight is read (100k documents
//! take seconds: rendering a prompt is string work, tokenizing is not done).

use std::io::BufReader;
use std::path::Path;

use super::input_hash::FileHasher;
use super::line::{identify, line_id, too_long_hash, SeenIds};
use super::{line_content, line_len, open_corpus, read_line_capped, CorpusError, CorpusOptions};

/// One non-blank line as the score run will see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScannedDoc {
    /// 1-based line number.
    pub line: usize,
    /// Its id, or `line:N` (see `line_id`) when it has no usable one.
    pub id: String,
    pub input_hash: String,
    /// False when the line fails before tokenizing (bad JSON, fields, duplicate id).
    pub parses: bool,
}

pub struct Scan {
    pub docs: Vec<ScannedDoc>,
    /// xxh3-128 of the file's bytes.
    pub file_hash: String,
}

/// Every non-blank line of the corpus at `path`, in order; `options` gives the template
/// the prompts are rendered with (its `skip_ids` are ignored: a scan sees every line).
pub fn scan(path: &Path, options: &CorpusOptions) -> Result<Scan, CorpusError> {
    let name = path.display().to_string();
    let mut input = BufReader::with_capacity(1 << 20, open_corpus(path)?);
    let mut hasher = FileHasher::default();
    let mut seen = SeenIds::default();
    let mut docs = vec![];
    let mut buf = vec![];
    for line_no in 1.. {
        buf.clear();
        let cap = options.limits.line_bytes;
        let n = read_line_capped(&mut input, &mut buf, cap, |b| hasher.update(b))
            .map_err(|source| CorpusError::Io { path: format!("{name}:{line_no}"), source })?;
        if n == 0 {
            break;
        }
        let len = line_len(n, &buf);
        if len > cap {
            // As the reader sees it: failed unread, by its line number (line::too_long).
            docs.push(ScannedDoc { line: line_no, id: line_id(line_no), input_hash: too_long_hash(len), parses: false });
            continue;
        }
        let Some(bytes) = line_content(line_no, &buf) else { continue };
        let found = identify(line_no, options, bytes, &mut seen);
        docs.push(ScannedDoc { line: line_no, id: found.id, input_hash: found.input_hash, parses: found.parsed.is_ok() });
    }
    Ok(Scan { docs, file_hash: hasher.finish() })
}
