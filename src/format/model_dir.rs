//! A converted model directory: manifest + tokenizer + one safetensors file per part.
//!
//! A rank touches only the files of its own parts (`open_for`, `check_parts`, `read_part`);
//! the other part files may be absent on its node. The tokenizer is read, and checked, only
//! where text is tokenized (`tokenizer`, on the writer). `open` and `verify` look at
//! everything; `upgrade` brings a directory of format version 1 up to date.

use super::manifest::{Manifest, PartEntry, MANIFEST_FILE};
use super::st::{self, dtype_from_st, FileHashes, StFile};
use super::{FormatError, Result};
use crate::config::ModelConfig;
use crate::model::{self, Part};
use crate::tensor::HostTensor;
use crate::tokenizer::Tokenizer;
use std::path::{Path, PathBuf};

pub struct ModelDir {
    dir: PathBuf,
    manifest: Manifest,
}

fn mismatch(path: &Path, msg: impl Into<String>) -> FormatError {
    FormatError::Mismatch { path: path.display().to_string(), msg: msg.into() }
}

impl ModelDir {
    /// Read the manifest and check that every part file and the tokenizer exist with their
    /// recorded sizes.
    pub fn open(dir: &Path) -> Result<ModelDir> {
        let md = ModelDir { dir: dir.to_path_buf(), manifest: Manifest::load(dir)? };
        for entry in &md.manifest.parts {
            md.check_size(entry)?;
        }
        let tok = md.tokenizer_path();
        let len = std::fs::metadata(&tok).map_err(|e| named_tokenizer_missing(&tok, e))?.len();
        if len != md.manifest.tokenizer_hash.bytes {
            return Err(mismatch(&tok, tokenizer_differs(&format!("{len} bytes, {MANIFEST_FILE} records {}", md.manifest.tokenizer_hash.bytes))));
        }
        Ok(md)
    }

    /// Read the manifest and check only `parts` (headers, shapes, sizes): a rank's start-up.
    /// Their contents are checked against the fast hash when `read_part` reads them.
    pub fn open_for(dir: &Path, parts: &[Part]) -> Result<ModelDir> {
        let md = ModelDir { dir: dir.to_path_buf(), manifest: Manifest::load(dir)? };
        md.check_parts(parts)?;
        Ok(md)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn config(&self) -> &ModelConfig {
        &self.manifest.config
    }

    pub fn tokenizer_path(&self) -> PathBuf {
        self.dir.join(&self.manifest.tokenizer)
    }

    /// The tokenizer, after checking its file against the manifest: another model's
    /// tokenizer.json, or one with two ids swapped, would turn the same text into other ids
    /// and score it without a sign of trouble. Read once, so what is checked is what is used.
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        let path = self.tokenizer_path();
        let bytes = std::fs::read(&path).map_err(|e| FormatError::io(&path, e))?;
        if let Some(diff) = FileHashes::of(&bytes).differs_from(&self.manifest.tokenizer_hash) {
            return Err(mismatch(&path, tokenizer_differs(&diff)));
        }
        Tokenizer::from_bytes(&bytes, &path.display().to_string()).map_err(FormatError::from)
    }

    pub fn part_path(&self, part: Part) -> PathBuf {
        self.dir.join(part.file_name())
    }

    fn entry(&self, part: Part) -> Result<&PartEntry> {
        self.manifest.part(part).ok_or_else(|| {
            let path = self.dir.join(super::manifest::MANIFEST_FILE);
            mismatch(&path, format!("no part `{}` (the model has {} layers)", part.name(), self.manifest.config.n_layers))
        })
    }

    fn check_size(&self, entry: &PartEntry) -> Result<()> {
        let path = self.dir.join(&entry.file);
        let meta = std::fs::metadata(&path).map_err(|e| FormatError::io(&path, e))?;
        if meta.len() != entry.bytes {
            return Err(mismatch(&path, format!("part `{}` is {} bytes, the manifest records {}", entry.name, meta.len(), entry.bytes)));
        }
        Ok(())
    }

    /// Map a part file and check its size, tensor names, shapes and dtype against the
    /// manifest and the family's table. Touches only the header pages.
    fn open_part(&self, part: Part) -> Result<StFile> {
        let entry = self.entry(part)?;
        self.check_size(entry)?;
        let file = StFile::open(&self.dir.join(&entry.file))?;
        let expected = model::expected_tensors(self.config(), part);
        for (name, shape) in &expected {
            let e = file.entry(name).ok_or_else(|| mismatch(file.path(), format!("missing tensor `{name}`")))?;
            if &e.shape != shape {
                return Err(mismatch(file.path(), format!("tensor `{name}`: expected shape {shape:?}, found {:?}", e.shape)));
            }
            if dtype_from_st(e.dtype) != Some(self.manifest.dtype) {
                let want = self.manifest.dtype.name();
                return Err(mismatch(file.path(), format!("tensor `{name}`: expected dtype {want} (manifest), found {:?}", e.dtype)));
            }
        }
        if let Some(extra) = file.names().iter().find(|n| !expected.iter().any(|(e, _)| e == *n)) {
            return Err(mismatch(file.path(), format!("unexpected tensor `{extra}` for part `{}`", part.name())));
        }
        Ok(file)
    }

    /// Asks the kernel to read these parts' files into the page cache now, all of them at
    /// once, so the parallel hashing that follows finds them there instead of each waiting on
    /// its own page faults: a cold start, from a local disk or a network file system, reads with a
    /// deep queue. Advice only: a file the kernel does not prefetch is read as before.
    pub fn prefetch(&self, parts: &[Part]) {
        use std::os::fd::AsRawFd;
        for entry in parts.iter().filter_map(|&p| self.manifest.part(p)) {
            if let Ok(f) = std::fs::File::open(self.dir.join(&entry.file)) {
                // SAFETY: posix_fadvise only reads the descriptor, which is open.
                unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_WILLNEED) };
            }
        }
    }

    /// Cheap start-up check of just these parts: sizes, headers, names, shapes, dtype.
    pub fn check_parts(&self, parts: &[Part]) -> Result<()> {
        parts.iter().try_for_each(|&p| self.open_part(p).map(|_| ()))
    }

    /// The tensors of one part under their short names, in the family table's order, after
    /// checking the file's content against the manifest's fast hash (when it has one): a
    /// corrupt part stops the job here, before any compute.
    pub fn read_part(&self, part: Part) -> Result<Vec<(String, HostTensor)>> {
        let file = self.open_part(part)?;
        let (mut tensors, xxh3) = file.read_all_hashed()?;
        let entry = self.entry(part)?;
        // Manifest::parse requires the hash, so None is a manifest built some other way.
        let want = entry.xxh3.as_deref().unwrap_or("(none)");
        if want != xxh3 {
            return Err(mismatch(
                file.path(),
                format!(
                    "part `{}`: content hash xxh3 {xxh3}, the manifest records {want}: the file is corrupt or changed \
                     since convert; copy it again or convert again",
                    part.name()
                ),
            ));
        }
        model::expected_tensors(self.config(), part)
            .into_iter()
            .map(|(name, _)| tensors.remove(&name).map(|t| (name.clone(), t)).ok_or_else(|| mismatch(file.path(), format!("missing tensor `{name}`"))))
            .collect()
    }

    /// Re-hash every part and the tokenizer against the manifest: (what, problem) for each
    /// that differs; the tokenizer is listed as `tokenizer`.
    pub fn verify(&self) -> Vec<(String, String)> {
        let mut bad: Vec<(String, String)> =
            self.manifest.parts.iter().filter_map(|entry| verify_part(&self.dir, entry).map(|problem| (entry.name.clone(), problem))).collect();
        let path = self.tokenizer_path();
        let problem = match st::hash_file(&path) {
            Err(e) => Some(e.to_string()),
            Ok(h) => h.differs_from(&self.manifest.tokenizer_hash).map(|d| format!("{}: {}", path.display(), tokenizer_differs(&d))),
        };
        bad.extend(problem.map(|p| ("tokenizer".to_string(), p)));
        bad
    }

    /// Bring a version 1 directory up to date: every part is re-hashed and must match the
    /// sha256 the old manifest records (nothing is written otherwise); then the parts' xxh3,
    /// the tokenizer's hashes and the new model id are recorded. The tokenizer is taken as it
    /// is now, as the old manifest has no hash to check it against.
    pub fn upgrade(dir: &Path) -> std::result::Result<Upgraded, UpgradeError> {
        let path = dir.join(MANIFEST_FILE);
        let bytes = std::fs::read(&path).map_err(|e| FormatError::io(&path, e))?;
        let Some(mut m) = Manifest::parse_legacy(&bytes, &path)? else {
            let m = Manifest::parse(&bytes, &path)?;
            return Err(UpgradeError::Current { version: m.format_version, model_id: m.model_id });
        };
        let old_id = m.model_id.clone();
        let mut bad = vec![];
        for entry in &mut m.parts {
            let file = dir.join(&entry.file);
            match st::hash_file(&file) {
                Err(e) => bad.push((entry.name.clone(), e.to_string())),
                Ok(h) => match part_differs(entry, &h) {
                    Some(d) => bad.push((entry.name.clone(), format!("{}: {d}", file.display()))),
                    None => entry.xxh3 = Some(h.xxh3),
                },
            }
        }
        if !bad.is_empty() {
            return Err(UpgradeError::PartsDiffer(bad));
        }
        let tok = dir.join(&m.tokenizer);
        m.tokenizer_hash = st::hash_file(&tok)?;
        m.format_version = super::manifest::FORMAT_VERSION;
        m.model_id = super::manifest::compute_model_id(&m.config, &m.parts, Some(&m.tokenizer_hash.sha256));
        m.save(dir)?;
        Ok(Upgraded { old_id, manifest: m })
    }
}

/// What `ModelDir::upgrade` did.
pub struct Upgraded {
    /// The id results files made with the old directory carry.
    pub old_id: String,
    pub manifest: Manifest,
}

#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error(transparent)]
    Format(#[from] FormatError),
    /// The directory is already at the current version.
    #[error("already at format version {version} (model id {model_id}); nothing to upgrade")]
    Current { version: u32, model_id: String },
    /// (part, problem) of every part that does not match its recorded sha256.
    #[error("{} parts differ from the manifest's sha256; nothing was written", .0.len())]
    PartsDiffer(Vec<(String, String)>),
}

/// The tokenizer file the manifest names cannot be read: say that the manifest names it, since
/// a damaged manifest can name a file that never existed.
fn named_tokenizer_missing(path: &Path, e: std::io::Error) -> FormatError {
    let kind = e.kind();
    FormatError::io(path, std::io::Error::new(kind, format!("{e} (the tokenizer file {MANIFEST_FILE} names)")))
}

fn tokenizer_differs(diff: &str) -> String {
    format!(
        "the tokenizer differs from the one this model was converted with ({diff}): another tokenizer turns the same \
         text into other ids; put back the model's own tokenizer.json or convert again"
    )
}

/// None when the part file matches its entry (size, sha256 and the xxh3 when recorded).
fn verify_part(dir: &Path, entry: &PartEntry) -> Option<String> {
    let path = dir.join(&entry.file);
    match st::hash_file(&path) {
        Err(e) => Some(e.to_string()),
        Ok(h) => part_differs(entry, &h).map(|d| format!("{}: {d}", path.display())),
    }
}

/// What differs between a part's hashes and its entry; an entry without xxh3 (version 1)
/// is judged by its size and sha256.
fn part_differs(entry: &PartEntry, h: &FileHashes) -> Option<String> {
    let xxh3 = entry.xxh3.clone().unwrap_or_else(|| h.xxh3.clone());
    h.differs_from(&FileHashes { bytes: entry.bytes, sha256: entry.sha256.clone(), xxh3 })
}
