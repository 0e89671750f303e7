//! The HDF5 writer: create or resume, append + flush, torn-tail repair.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use hdf5::types::VarLenUnicode;
use hdf5::{Dataset, File, Group, H5Type};

use super::reserve::{is_no_space, Reserve, MIN_RESERVE};
use super::{At, DocResult, ResultsError, RunMeta, SCHEMA};

// ~1024 documents or 4096 choice rows per chunk: a few appends per chunk at typical batch
// sizes, and small enough that the last, partly filled chunk costs little.
const DOC_CHUNK: usize = 1024;
const CHOICE_CHUNK: usize = 4096;

pub(super) const DOC_SETS: [&str; 7] = ["id", "status", "error", "n_prompt_tokens", "best", "choice_offset", "n_choices"];
pub(super) const CHOICE_SETS: [&str; 6] = ["text", "n_tokens", "logprob", "logprob_mean", "logprob_per_char", "prob"];

pub struct ResultsWriter {
    path: PathBuf,
    name: String,
    file: File,
    docs: Group,
    choices: Group,
    n_docs: usize,
    n_rows: usize,
    repair_note: Option<String>,
    /// Set when an append failed half way: the file is only made consistent again by the
    /// repair on the next open, so further appends here would build on a torn tail.
    broken: bool,
    closed: bool,
    /// Room held for the next append (see reserve.rs); None once closed.
    reserve: Option<Reserve>,
}

/// Root attribute: 1 when the last writer closed the file, 0 while one has it open. HDF5
/// (1.10, no SWMR) updates metadata in place, so a job killed mid-append can leave the
/// file readable but not safely writable; a file found not closed cleanly is rebuilt
/// from what it holds before anything is appended.
const CLOSED_ATTR: &str = "closed_cleanly";

fn set_closed(file: &File, closed: bool, path: &str) -> Result<(), ResultsError> {
    let what = format!("marking the file {}", if closed { "closed" } else { "open" });
    let attr = match file.attr(CLOSED_ATTR) {
        Ok(a) => a,
        Err(_) => file.new_attr::<u8>().shape(()).create(CLOSED_ATTR).at(path, &what)?,
    };
    attr.write_scalar(&u8::from(closed)).at(path, &what)?;
    file.flush().at(path, &what)
}

// Not bound by hdf5-metno-sys; exported by libhdf5 since 1.10.2 (Debian's 1.10.8 here,
// Ubuntu 24.04's 1.10.10 on the GPU machines). hid_t is 64-bit since 1.10.
extern "C" {
    fn H5Fincrement_filesize(file_id: i64, increment: u64) -> i32;
}

/// A killed writer can leave metadata pointing past the end-of-allocation the superblock
/// records ("len exceeds EOA" on read) although the bytes are in the file; move the EOA
/// to the end of the file, as `h5clear --increment=0` does, so they can be read.
fn extend_eoa(path: &Path) -> Result<(), ResultsError> {
    let name = path.display().to_string();
    let file = File::open_rw(path).at(&name, "opening to recover")?;
    // SAFETY: `file` keeps the id open for the call; sync() holds hdf5-metno's global
    // lock, as its own FFI calls do, since the library is not thread-safe.
    let rc = hdf5::sync::sync(|| unsafe { H5Fincrement_filesize(file.id(), 0) });
    if rc < 0 {
        return Err(ResultsError::Corrupt { path: name, msg: "cannot move the end of allocation to the end of file".into() });
    }
    file.flush().at(&name, "flushing")
}

fn closed_cleanly(file: &File) -> bool {
    file.attr(CLOSED_ATTR).and_then(|a| a.read_scalar::<u8>()).is_ok_and(|v| v == 1)
}

/// An HDF5 string; NUL cannot be stored in one, so it becomes U+FFFD (the corpus already
/// refuses NUL in ids, so this only touches free text).
pub(super) fn vlu(s: &str) -> VarLenUnicode {
    let clean = if s.contains('\0') { s.replace('\0', "\u{FFFD}") } else { s.to_string() };
    clean.parse().unwrap_or_default()
}

fn int32(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

fn write_str_attr(file: &File, name: &str, value: &str, path: &str) -> Result<(), ResultsError> {
    let what = format!("writing attribute {name}");
    let attr = file.new_attr::<VarLenUnicode>().shape(()).create(name).at(path, &what)?;
    attr.write_scalar(&vlu(value)).at(path, &what)
}

pub(super) fn read_str_attr(file: &File, name: &str) -> Option<String> {
    let attr = file.attr(name).ok()?;
    attr.read_scalar::<VarLenUnicode>().ok().map(|v| v.as_str().to_string())
}

fn create_set<T: H5Type>(group: &Group, name: &str, chunk: usize, path: &str) -> Result<(), ResultsError> {
    group.new_dataset::<T>().chunk(chunk).shape(0..).create(name).at(path, &format!("creating {name}"))?;
    Ok(())
}

/// Resize `ds` to hold `data` after its first `at` rows and write it there.
fn extend<T: H5Type>(ds: &Dataset, at: usize, data: &[T], path: &str) -> Result<(), ResultsError> {
    if data.is_empty() {
        return Ok(());
    }
    let what = format!("appending to {}", ds.name());
    ds.resize(at + data.len()).at(path, &what)?;
    ds.write_slice(data, at..at + data.len()).at(path, &what)
}

/// The first elements of a 1-D dataset, up to `n`, read in blocks; stops short at the
/// first block that cannot be read (a killed writer's tail), which callers treat as torn.
pub(super) fn read_readable<T: H5Type + Clone>(ds: &Dataset, n: usize) -> Vec<T> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let end = (out.len() + DOC_CHUNK).min(n);
        match ds.read_slice_1d::<T, _>(out.len()..end) {
            Ok(block) => out.extend(block.iter().cloned()),
            Err(e) => {
                // A block fails whole when any element in it does (a string whose heap
                // collection was never written): keep the readable rows before that one.
                while out.len() < end {
                    match ds.read_slice_1d::<T, _>(out.len()..out.len() + 1) {
                        Ok(one) => out.extend(one.iter().cloned()),
                        Err(_) => break,
                    }
                }
                tracing::warn!("{}: unreadable from row {}: {e}", ds.name(), out.len());
                break;
            }
        }
    }
    out
}

/// The first `n` elements of a 1-D dataset.
pub(super) fn read_prefix<T: H5Type + Clone>(ds: &Dataset, n: usize, path: &str) -> Result<Vec<T>, ResultsError> {
    if n == 0 {
        return Ok(Vec::new());
    }
    Ok(ds.read_slice_1d::<T, _>(0..n).at(path, &format!("reading {}", ds.name()))?.to_vec())
}

pub(super) fn dataset(group: &Group, name: &str, path: &str) -> Result<Dataset, ResultsError> {
    group
        .dataset(name)
        .map_err(|e| ResultsError::Corrupt { path: path.to_string(), msg: format!("missing dataset {}/{name}: {e}", group.name()) })
}

/// The longest prefix of documents whose status was written (the commit marker, written
/// last) and whose choice rows are contiguous and present: (documents, choice rows).
pub(super) fn valid_prefix(status: &[VarLenUnicode], offsets: &[i64], counts: &[i32], choice_rows: usize) -> (usize, usize) {
    let mut end = 0usize;
    for (i, ((s, &off), &n)) in status.iter().zip(offsets).zip(counts).enumerate() {
        let ok_status = matches!(s.as_str(), "ok" | "error");
        let next = usize::try_from(n).ok().map(|n| end + n);
        match next {
            Some(next) if ok_status && off == end as i64 && next <= choice_rows => end = next,
            _ => return (i, end),
        }
    }
    (status.len().min(offsets.len()).min(counts.len()), end)
}

impl ResultsWriter {
    /// Open the results file for `meta`'s run. A new (or `overwrite`n) file starts empty;
    /// an existing one from the same model, norm and template is resumed and the ids it
    /// already holds are returned, for the caller to skip. A file from another run is
    /// refused, naming the attribute that differs.
    pub fn open(path: &Path, meta: RunMeta, overwrite: bool) -> Result<(ResultsWriter, HashSet<String>), ResultsError> {
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
        let (mut w, done) = ResultsWriter::resume(path, &meta)?;
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

    fn resume(path: &Path, meta: &RunMeta) -> Result<(ResultsWriter, HashSet<String>), ResultsError> {
        let name = path.display().to_string();
        let open = || {
            File::open_rw(path)
                .map_err(|e| ResultsError::NotResults { path: name.clone(), why: format!("cannot open it as HDF5: {e}") })
        };
        let mut file = open()?;
        check_meta(&file, meta, &name)?;
        let mut rebuilt = None;
        if !closed_cleanly(&file) {
            drop(file);
            rebuilt = Some(rebuild(path, meta)?);
            file = open()?;
        }
        set_closed(&file, false, &name)?;
        let docs = file.group("docs").map_err(|e| ResultsError::Corrupt { path: name.clone(), msg: format!("missing group /docs: {e}") })?;
        let choices =
            file.group("choices").map_err(|e| ResultsError::Corrupt { path: name.clone(), msg: format!("missing group /choices: {e}") })?;
        let mut w = ResultsWriter {
            path: path.to_path_buf(),
            name,
            file,
            docs,
            choices,
            n_docs: 0,
            n_rows: 0,
            repair_note: None,
            broken: false,
            closed: false,
            reserve: None,
        };
        let done = w.repair()?;
        if let Some(kept) = rebuilt {
            let note = format!("the last writer did not close the file; rebuilt it from its {kept} whole documents");
            tracing::warn!("{}: {note}", w.name);
            w.repair_note = Some(note);
        }
        Ok((w, done))
    }

    /// Cut a torn tail (a job killed inside `append`) back to the last whole document;
    /// returns the ids of the documents kept.
    fn repair(&mut self) -> Result<HashSet<String>, ResultsError> {
        let p = self.name.clone();
        let doc_sets: Vec<Dataset> = DOC_SETS.iter().map(|n| dataset(&self.docs, n, &p)).collect::<Result<_, _>>()?;
        let choice_sets: Vec<Dataset> = CHOICE_SETS.iter().map(|n| dataset(&self.choices, n, &p)).collect::<Result<_, _>>()?;
        let doc_lens: Vec<usize> = doc_sets.iter().map(|d| d.size()).collect();
        let row_lens: Vec<usize> = choice_sets.iter().map(|d| d.size()).collect();
        let n = doc_lens.iter().copied().min().unwrap_or(0);
        let rows = row_lens.iter().copied().min().unwrap_or(0);

        let status: Vec<VarLenUnicode> = read_prefix(&doc_sets[1], n, &p)?;
        let offsets: Vec<i64> = read_prefix(&doc_sets[5], n, &p)?;
        let counts: Vec<i32> = read_prefix(&doc_sets[6], n, &p)?;
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
            tracing::warn!("{p}: {note}");
            self.repair_note = Some(note);
        }
        self.n_docs = keep;
        self.n_rows = keep_rows;
        let ids: Vec<VarLenUnicode> = read_prefix(&doc_sets[0], keep, &p)?;
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
        let p = self.name.clone();
        let rows: Vec<_> = docs.iter().flat_map(|d| &d.choices).collect();
        let ch = |name: &str| dataset(&self.choices, name, &p);
        let at = self.n_rows;
        extend(&ch("text")?, at, &rows.iter().map(|r| vlu(&r.text)).collect::<Vec<_>>(), &p)?;
        extend(&ch("n_tokens")?, at, &rows.iter().map(|r| int32(r.n_tokens)).collect::<Vec<_>>(), &p)?;
        extend(&ch("logprob")?, at, &rows.iter().map(|r| r.logprob).collect::<Vec<_>>(), &p)?;
        extend(&ch("logprob_mean")?, at, &rows.iter().map(|r| r.logprob_mean).collect::<Vec<_>>(), &p)?;
        extend(&ch("logprob_per_char")?, at, &rows.iter().map(|r| r.logprob_per_char).collect::<Vec<_>>(), &p)?;
        extend(&ch("prob")?, at, &rows.iter().map(|r| r.prob).collect::<Vec<_>>(), &p)?;

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
        extend(&ds("n_prompt_tokens")?, at, &docs.iter().map(|d| int32(d.n_prompt_tokens)).collect::<Vec<_>>(), &p)?;
        extend(&ds("best")?, at, &docs.iter().map(|d| d.best.map_or(-1, int32)).collect::<Vec<_>>(), &p)?;
        extend(&ds("choice_offset")?, at, &offsets, &p)?;
        extend(&ds("n_choices")?, at, &docs.iter().map(|d| int32(d.choices.len())).collect::<Vec<_>>(), &p)?;
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
            tracing::warn!("{e}");
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
    let doc_chunk_bytes = DOC_CHUNK * (3 * 16 + 4 + 4 + 8 + 4);
    let choice_chunk_bytes = CHOICE_CHUNK * (16 + 4 + 4 * 8);
    let chunks = new_chunks(n_docs, docs.len(), DOC_CHUNK) * doc_chunk_bytes + new_chunks(n_rows, rows, CHOICE_CHUNK) * choice_chunk_bytes;
    let string = |s: &str| s.len() + 32;
    let strings: usize = docs
        .iter()
        .map(|d| string(&d.id) + string(&d.error) + string(d.status.as_str()) + d.choices.iter().map(|c| string(&c.text)).sum::<usize>())
        .sum();
    let raw = chunks + strings + docs.len() * 20 + rows * 36;
    (2 * raw as u64 + (256 << 10)).max(MIN_RESERVE)
}

/// Rewrite the whole documents of a file that was not closed cleanly into a new file
/// (temporary name, then renamed over it); returns how many were kept.
fn rebuild(path: &Path, meta: &RunMeta) -> Result<usize, ResultsError> {
    let name = path.display().to_string();
    extend_eoa(path)?;
    let docs = super::read_results(path).map_err(|e| ResultsError::Corrupt {
        path: name.clone(),
        msg: format!("the last writer did not close the file and it cannot be read back ({e}); pass --overwrite to start again"),
    })?;
    let created = File::open(path).ok().and_then(|f| read_str_attr(&f, "created"));
    let tmp = tmp_path(path);
    let result = (|| {
        build_empty(&tmp, meta, created.as_deref())?;
        let (mut w, _) = ResultsWriter::resume(&tmp, meta)?;
        for chunk in docs.chunks(4096) {
            w.append(chunk)?;
        }
        w.close()
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path).map_err(|source| ResultsError::Io { path: name, source })?;
    Ok(docs.len())
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp{}", std::process::id()));
    PathBuf::from(tmp)
}

fn check_meta(file: &File, meta: &RunMeta, path: &str) -> Result<(), ResultsError> {
    match read_str_attr(file, "schema") {
        Some(s) if s == SCHEMA => {}
        Some(s) => return Err(ResultsError::NotResults { path: path.into(), why: format!("schema {s:?}, expected {SCHEMA:?}") }),
        None => return Err(ResultsError::NotResults { path: path.into(), why: "no schema attribute".into() }),
    }
    let wanted = [
        ("model", meta.model_id.as_str()),
        ("norm", meta.norm.name()),
        ("template", meta.template.as_str()),
        ("target_delimiter", meta.delimiter.as_str()),
    ];
    for (attr, want) in wanted {
        let Some(found) = read_str_attr(file, attr) else {
            return Err(ResultsError::Unrecorded { path: path.into(), attr, wanted: want.to_string() });
        };
        if found != want {
            return Err(ResultsError::Mismatch { path: path.into(), attr, found, wanted: want.to_string() });
        }
    }
    Ok(())
}

/// Build the empty file under a temporary name and rename it into place, so the path
/// never holds a half-created file (and --overwrite replaces the old one atomically).
fn create(path: &Path, meta: &RunMeta) -> Result<(), ResultsError> {
    let name = path.display().to_string();
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| ResultsError::Io { path: dir.display().to_string(), source })?;
    }
    let tmp = tmp_path(path);
    if let Err(e) = build_empty(&tmp, meta, None) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path).map_err(|source| ResultsError::Io { path: name, source })
}

/// A closed, empty results file at `path`; `created` keeps the original run's date.
fn build_empty(path: &Path, meta: &RunMeta, created: Option<&str>) -> Result<(), ResultsError> {
    let name = path.display().to_string();
    let file = File::create(path).at(&name, "creating")?;
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    for (attr, value) in [
        ("schema", SCHEMA),
        ("model", meta.model_id.as_str()),
        ("norm", meta.norm.name()),
        ("template", meta.template.as_str()),
        ("target_delimiter", meta.delimiter.as_str()),
        ("created", created.unwrap_or(&now)),
        ("version", env!("CARGO_PKG_VERSION")),
    ] {
        write_str_attr(&file, attr, value, &name)?;
    }
    let docs = file.create_group("docs").at(&name, "creating /docs")?;
    create_set::<VarLenUnicode>(&docs, "id", DOC_CHUNK, &name)?;
    create_set::<VarLenUnicode>(&docs, "status", DOC_CHUNK, &name)?;
    create_set::<VarLenUnicode>(&docs, "error", DOC_CHUNK, &name)?;
    create_set::<i32>(&docs, "n_prompt_tokens", DOC_CHUNK, &name)?;
    create_set::<i32>(&docs, "best", DOC_CHUNK, &name)?;
    create_set::<i64>(&docs, "choice_offset", DOC_CHUNK, &name)?;
    create_set::<i32>(&docs, "n_choices", DOC_CHUNK, &name)?;
    let choices = file.create_group("choices").at(&name, "creating /choices")?;
    create_set::<VarLenUnicode>(&choices, "text", CHOICE_CHUNK, &name)?;
    create_set::<i32>(&choices, "n_tokens", CHOICE_CHUNK, &name)?;
    for set in ["logprob", "logprob_mean", "logprob_per_char", "prob"] {
        create_set::<f64>(&choices, set, CHOICE_CHUNK, &name)?;
    }
    set_closed(&file, true, &name)
}
