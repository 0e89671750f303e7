//! The results writer: create or resume a file, append documents and flush, cut a torn tail.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use hdf5::types::VarLenUnicode;
use hdf5::{Dataset, File, Group};

use super::h5::{dataset, extend, int32, read_prefix, vlu};
use super::recover::rebuild;
use super::reserve::{is_no_space, Reserve, MIN_RESERVE};
use super::schema::{check_meta, closed_cleanly, create, set_closed, set_names, valid_prefix, write_about, CHOICE_CHUNK, DOC_CHUNK};
use super::{record_check, At, DocResult, ExtractDoc, ResultsError, RunMeta};

pub struct ResultsWriter {
    path: PathBuf,
    name: String,
    file: File,
    docs: Group,
    choices: Group,
    n_docs: usize,
    n_rows: usize,
    /// An extract file: its extra columns are written too.
    extract: bool,
    repair_note: Option<String>,
    /// Set when an append failed half way: the file is only made consistent again by the
    /// repair on the next open, so further appends here would build on a torn tail.
    broken: bool,
    closed: bool,
    /// Room held for the next append (see reserve.rs); None once closed.
    reserve: Option<Reserve>,
}

impl ResultsWriter {
    /// Open the results file for `meta`'s run. A new (or `overwrite`n) file starts empty;
    /// an existing one from the same model, norm and template is resumed and the ids it
    /// already holds are returned, for the caller to skip. A file from another run is
    /// refused, naming the attribute that differs.
    pub fn open(path: &Path, meta: RunMeta, overwrite: bool) -> Result<(ResultsWriter, HashSet<String>), ResultsError> {
        ResultsWriter::open_dropping(path, meta, overwrite, &HashSet::new())
    }

    /// [`open`](Self::open), first removing the records of the ids in `drop` (documents a
    /// resume scores again: see plan.rs), so the file never holds two records for one id.
    pub fn open_dropping(
        path: &Path,
        meta: RunMeta,
        overwrite: bool,
        drop: &HashSet<String>,
    ) -> Result<(ResultsWriter, HashSet<String>), ResultsError> {
        let name = path.display().to_string();
        // A zero-length file is what a job killed before HDF5 wrote anything leaves.
        let fresh = match std::fs::metadata(path) {
            Ok(m) if m.is_dir() => {
                let source = std::io::Error::other("is a directory, expected an HDF5 file path");
                return Err(ResultsError::Io { path: name, source });
            }
            Ok(m) => overwrite || m.len() == 0,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
            Err(source) => return Err(ResultsError::Io { path: name, source }),
        };
        if fresh {
            create(path, &meta)?;
        }
        let (mut w, done) = ResultsWriter::resume(path, &meta, drop)?;
        let reserve = Reserve::open(path).map_err(|source| ResultsError::Io { path: Reserve::path_for(path).display().to_string(), source })?;
        // Held from the first append on, so resuming a finished run needs no free space.
        w.reserve = Some(reserve);
        Ok((w, done))
    }

    /// Grow the reserve to `bytes`; a full file system is reported as NoSpace, naming the
    /// output file, before anything is written.
    fn hold(&mut self, bytes: u64, what: &str) -> Result<(), ResultsError> {
        let Some(reserve) = self.reserve.as_mut() else { return Ok(()) };
        reserve.hold(bytes).map_err(|source| {
            if is_no_space(&source) {
                ResultsError::NoSpace { path: self.name.clone(), what: format!("{what} (up to {bytes} bytes)"), kept: self.n_docs }
            } else {
                ResultsError::Io { path: Reserve::path_for(&self.path).display().to_string(), source }
            }
        })
    }

    pub(super) fn resume(path: &Path, meta: &RunMeta, drop: &HashSet<String>) -> Result<(ResultsWriter, HashSet<String>), ResultsError> {
        let name = path.display().to_string();
        let open = || {
            File::open_rw(path)
                .map_err(|source| ResultsError::NotHdf5 { path: name.clone(), source })
        };
        let mut file = open()?;
        check_meta(&file, meta, &name)?;
        let mut rebuilt = None;
        let torn = !closed_cleanly(&file);
        if torn || !drop.is_empty() {
            std::mem::drop(file);
            rebuilt = Some(rebuild(path, meta, drop)?).filter(|_| torn);
            file = open()?;
        }
        set_closed(&file, false, &name)?;
        write_about(&file, meta, &name)?;
        let docs = file.group("docs").map_err(|source| ResultsError::Hdf5 { path: name.clone(), what: "missing group /docs".into(), source })?;
        let choices =
            file.group("choices").map_err(|source| ResultsError::Hdf5 { path: name.clone(), what: "missing group /choices".into(), source })?;
        let mut w = ResultsWriter {
            path: path.to_path_buf(),
            name,
            file,
            docs,
            choices,
            n_docs: 0,
            n_rows: 0,
            extract: meta.extract.is_some(),
            repair_note: None,
            broken: false,
            closed: false,
            reserve: None,
        };
        let done = w.repair()?;
        if let Some(kept) = rebuilt {
            let note = format!("the last writer did not close the file; rebuilt it from its {kept} whole documents");
            w.repair_note = Some(note);
        }
        Ok((w, done))
    }

    /// Cut a torn tail (a job killed inside `append`) back to the last whole document;
    /// returns the ids of the documents kept.
    fn repair(&mut self) -> Result<HashSet<String>, ResultsError> {
        let p = self.name.clone();
        let (doc_names, row_names) = set_names(self.extract);
        let doc_sets: Vec<Dataset> = doc_names.iter().map(|s| dataset(&self.docs, s, &p)).collect::<Result<_, _>>()?;
        let choice_sets: Vec<Dataset> = row_names.iter().map(|s| dataset(&self.choices, s, &p)).collect::<Result<_, _>>()?;
        let doc_lens: Vec<usize> = doc_sets.iter().map(|d| d.size()).collect();
        let row_lens: Vec<usize> = choice_sets.iter().map(|d| d.size()).collect();
        let n = doc_lens.iter().copied().min().unwrap_or(0);
        let rows = row_lens.iter().copied().min().unwrap_or(0);

        let set = |name: &str| dataset(&self.docs, name, &p);
        let status: Vec<VarLenUnicode> = read_prefix(&set("status")?, n, &p)?;
        let offsets: Vec<i64> = read_prefix(&set("choice_offset")?, n, &p)?;
        let counts: Vec<i32> = read_prefix(&set("n_choices")?, n, &p)?;
        let (keep, keep_rows) = valid_prefix(&status, &offsets, &counts, rows);

        let torn = doc_lens.iter().any(|&l| l != keep) || row_lens.iter().any(|&l| l != keep_rows);
        if torn {
            for ds in &doc_sets {
                ds.resize(keep).at(&p, &format!("cutting {} to {keep}", ds.name()))?;
            }
            for ds in &choice_sets {
                ds.resize(keep_rows).at(&p, &format!("cutting {} to {keep_rows}", ds.name()))?;
            }
            self.file.flush().at(&p, "flushing the repaired file")?;
            let note = format!(
                "repaired a torn tail: kept {keep} documents and {keep_rows} choice rows (datasets had {doc_lens:?} and {row_lens:?})"
            );
            self.repair_note = Some(note);
        }
        self.n_docs = keep;
        self.n_rows = keep_rows;
        let ids: Vec<VarLenUnicode> = read_prefix(&set("id")?, keep, &p)?;
        Ok(ids.iter().map(|s| s.as_str().to_string()).collect())
    }

    /// Append documents and flush, so a job killed after this returns loses nothing.
    pub fn append(&mut self, docs: &[DocResult]) -> Result<(), ResultsError> {
        if self.broken {
            return Err(ResultsError::Corrupt {
                path: self.name.clone(),
                msg: "an earlier append failed; reopen the file (it repairs the tail) before writing more".into(),
            });
        }
        // Make sure the room this append can need is free, then hand it to HDF5.
        let need = append_bytes(self.n_docs, self.n_rows, docs);
        self.hold(need, &format!("no room for the next {} documents", docs.len()))?;
        if let Some(r) = self.reserve.as_mut() {
            r.release().map_err(|source| ResultsError::Io { path: Reserve::path_for(&self.path).display().to_string(), source })?;
        }
        self.broken = true;
        if let Err(e) = self.write(docs) {
            return Err(self.no_space(e));
        }
        self.broken = false;
        // Take the room back for the next append; if the disk filled meanwhile, that append
        // stops before writing (the documents just written are safe).
        let _ = self.reserve.as_mut().map(|r| r.hold(need));
        Ok(())
    }

    /// An HDF5 failure for lack of space, said plainly. The reserve makes this rare (only
    /// another process filling the disk during the append); the file may then need the
    /// repair that the next open does.
    fn no_space(&self, e: ResultsError) -> ResultsError {
        let full = match &e {
            ResultsError::Hdf5 { source, .. } => {
                let text = source.to_string();
                text.contains("errno = 28") || text.contains("errno = 122") || text.contains("No space left on device")
            }
            _ => false,
        };
        match (full, e) {
            (true, ResultsError::Hdf5 { path, what, .. }) => ResultsError::NoSpace {
                path,
                what: format!("{what} failed (the next run repairs the file's tail)"),
                kept: self.n_docs,
            },
            (_, e) => e,
        }
    }

    fn write(&mut self, docs: &[DocResult]) -> Result<(), ResultsError> {
        if docs.is_empty() {
            return Ok(());
        }
        // In an extract file every document has the extract fields (a failed one, zeros),
        // as they are read back and checked.
        let filled: Vec<DocResult>;
        let docs = if self.extract && docs.iter().any(|d| d.extract.is_none()) {
            filled = docs.iter().map(|d| DocResult { extract: Some(d.extract.clone().unwrap_or_default()), ..d.clone() }).collect();
            &filled[..]
        } else {
            docs
        };
        let p = self.name.clone();
        let rows: Vec<_> = docs.iter().flat_map(|d| &d.choices).collect();
        let ch = |name: &str| dataset(&self.choices, name, &p);
        let at = self.n_rows;
        let doc_of: Vec<i64> = docs.iter().enumerate().flat_map(|(i, d)| std::iter::repeat_n((self.n_docs + i) as i64, d.choices.len())).collect();
        extend(&ch("doc")?, at, &doc_of, &p)?;
        extend(&ch("text")?, at, &rows.iter().map(|r| vlu(&r.text)).collect::<Vec<_>>(), &p)?;
        extend(&ch("n_tokens")?, at, &rows.iter().map(|r| int32(r.n_tokens)).collect::<Vec<_>>(), &p)?;
        extend(&ch("logprob")?, at, &rows.iter().map(|r| r.logprob).collect::<Vec<_>>(), &p)?;
        extend(&ch("logprob_mean")?, at, &rows.iter().map(|r| r.logprob_mean).collect::<Vec<_>>(), &p)?;
        extend(&ch("logprob_per_char")?, at, &rows.iter().map(|r| r.logprob_per_char).collect::<Vec<_>>(), &p)?;
        extend(&ch("prob")?, at, &rows.iter().map(|r| r.prob).collect::<Vec<_>>(), &p)?;
        if self.extract {
            let spans: Vec<_> = docs.iter().flat_map(|d| d.extract.iter().flat_map(|x| &x.spans)).collect();
            extend(&ch("start")?, at, &spans.iter().map(|s| s.start as i64).collect::<Vec<_>>(), &p)?;
            extend(&ch("end")?, at, &spans.iter().map(|s| s.end as i64).collect::<Vec<_>>(), &p)?;
            extend(&ch("span_logprob")?, at, &spans.iter().map(|s| s.span_logprob).collect::<Vec<_>>(), &p)?;
        }

        let mut offsets = Vec::with_capacity(docs.len());
        let mut next = self.n_rows as i64;
        for d in docs {
            offsets.push(next);
            next += d.choices.len() as i64;
        }
        let ds = |name: &str| dataset(&self.docs, name, &p);
        let at = self.n_docs;
        extend(&ds("id")?, at, &docs.iter().map(|d| vlu(&d.id)).collect::<Vec<_>>(), &p)?;
        extend(&ds("error")?, at, &docs.iter().map(|d| vlu(&d.error)).collect::<Vec<_>>(), &p)?;
        extend(&ds("input_hash")?, at, &docs.iter().map(|d| vlu(&d.input_hash)).collect::<Vec<_>>(), &p)?;
        extend(&ds("record_check")?, at, &docs.iter().map(record_check).collect::<Vec<_>>(), &p)?;
        extend(&ds("n_prompt_tokens")?, at, &docs.iter().map(|d| int32(d.n_prompt_tokens)).collect::<Vec<_>>(), &p)?;
        extend(&ds("best")?, at, &docs.iter().map(|d| d.best.map_or(-1, int32)).collect::<Vec<_>>(), &p)?;
        extend(&ds("choice_offset")?, at, &offsets, &p)?;
        extend(&ds("n_choices")?, at, &docs.iter().map(|d| int32(d.choices.len())).collect::<Vec<_>>(), &p)?;
        if self.extract {
            let x: Vec<&ExtractDoc> = docs.iter().filter_map(|d| d.extract.as_ref()).collect();
            extend(&ds("passes")?, at, &x.iter().map(|x| int32(x.passes)).collect::<Vec<_>>(), &p)?;
            extend(&ds("tree_tokens")?, at, &x.iter().map(|x| x.tree_tokens as i64).collect::<Vec<_>>(), &p)?;
            extend(&ds("n_candidates")?, at, &x.iter().map(|x| x.candidates as i64).collect::<Vec<_>>(), &p)?;
            extend(&ds("answer")?, at, &x.iter().map(|x| vlu(&x.answer)).collect::<Vec<_>>(), &p)?;
        }
        // Status last: it is the commit marker the repair trusts.
        extend(&ds("status")?, at, &docs.iter().map(|d| vlu(d.status.as_str())).collect::<Vec<_>>(), &p)?;
        self.file.flush().at(&p, "flushing")?;
        self.n_docs += docs.len();
        self.n_rows += rows.len();
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Documents in the file.
    pub fn n_docs(&self) -> usize {
        self.n_docs
    }

    /// What the repair on open did, if it had to cut anything.
    pub fn repair_note(&self) -> Option<&str> {
        self.repair_note.as_deref()
    }

    /// Mark the file closed cleanly and flush. Dropping the writer does the same but
    /// cannot report an error.
    pub fn close(mut self) -> Result<(), ResultsError> {
        self.finish()
    }

    fn finish(&mut self) -> Result<(), ResultsError> {
        // The reserve's room is what the closing mark is written with.
        if let Some(r) = self.reserve.take() {
            r.remove();
        }
        if self.closed || self.broken {
            return Ok(()); // a broken writer leaves the mark at 0: the next open rebuilds
        }
        self.closed = true;
        set_closed(&self.file, true, &self.name)
    }
}

impl Drop for ResultsWriter {
    fn drop(&mut self) {
        if let Err(e) = self.finish() {
            // Drop has no caller to hand the error to; the next open rebuilds the file.
            crate::warn!("{e}");
        }
    }
}

/// At most what appending `docs` after `n_docs` documents and `n_rows` choice rows can
/// make HDF5 allocate: every chunk it may start, each string in the global heap with its
/// object header, all doubled, plus room for B-tree nodes and a new heap collection.
fn append_bytes(n_docs: usize, n_rows: usize, docs: &[DocResult]) -> u64 {
    let new_chunks = |at: usize, add: usize, chunk: usize| (at + add).div_ceil(chunk) - at.div_ceil(chunk);
    let rows: usize = docs.iter().map(|d| d.choices.len()).sum();
    // Bytes per element in a chunk: strings are 16-byte heap references.
    let doc_chunk_bytes = DOC_CHUNK * (4 * 16 + 8 + 4 + 4 + 8 + 4);
    let choice_chunk_bytes = CHOICE_CHUNK * (8 + 16 + 4 + 4 * 8);
    let chunks = new_chunks(n_docs, docs.len(), DOC_CHUNK) * doc_chunk_bytes + new_chunks(n_rows, rows, CHOICE_CHUNK) * choice_chunk_bytes;
    let string = |s: &str| s.len() + 32;
    let strings: usize = docs
        .iter()
        .map(|d| {
            string(&d.id) + string(&d.error) + string(d.status.as_str()) + string(&d.input_hash) + d.choices.iter().map(|c| string(&c.text)).sum::<usize>()
                + d.extract.as_ref().map_or(0, |x| string(&x.answer))
        })
        .sum();
    // The extract columns: at most 2 chunks more per group, and their bytes per element.
    let extract = if docs.iter().any(|d| d.extract.is_some()) { 2 * (doc_chunk_bytes + choice_chunk_bytes) + docs.len() * 36 + rows * 24 } else { 0 };
    let raw = chunks + strings + docs.len() * 28 + rows * 44 + extract;
    (2 * raw as u64 + (256 << 10)).max(MIN_RESERVE)
}
