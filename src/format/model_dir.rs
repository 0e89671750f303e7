//! A converted model directory: manifest + one safetensors file per part.
//!
//! A rank touches only the files of its own parts (`open_for`, `check_parts`, `read_part`);
//! the other part files may be absent on its node. `open` and `verify` look at all of them.

use super::manifest::{Manifest, PartEntry};
use super::st::{self, dtype_from_st, StFile};
use super::{FormatError, Result};
use crate::config::ModelConfig;
use crate::model::{self, Part};
use crate::tensor::HostTensor;
use std::path::{Path, PathBuf};

pub struct ModelDir {
    dir: PathBuf,
    manifest: Manifest,
}

fn mismatch(path: &Path, msg: impl Into<String>) -> FormatError {
    FormatError::Mismatch { path: path.display().to_string(), msg: msg.into() }
}

impl ModelDir {
    /// Read the manifest and check that every part file exists with its recorded size.
    pub fn open(dir: &Path) -> Result<ModelDir> {
        let md = ModelDir { dir: dir.to_path_buf(), manifest: Manifest::load(dir)? };
        for entry in &md.manifest.parts {
            md.check_size(entry)?;
        }
        Ok(md)
    }

    /// Read the manifest and check only `parts` (headers, shapes, sizes): a rank's start-up.
    /// Their contents are checked against the fast hash when `read_part` reads them.
    pub fn open_for(dir: &Path, parts: &[Part]) -> Result<ModelDir> {
        let md = ModelDir { dir: dir.to_path_buf(), manifest: Manifest::load(dir)? };
        md.check_parts(parts)?;
        if !parts.is_empty() && !md.manifest.has_fast_hashes() {
            eprintln!(
                "notice: {} has no fast content hashes (converted by an older falcon-batch): parts load unchecked; \
                 `falcon-batch inspect --verify` checks them, converting again adds the hashes",
                dir.join(super::manifest::MANIFEST_FILE).display()
            );
        }
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
        if let Some(want) = &entry.xxh3 {
            if *want != xxh3 {
                return Err(mismatch(
                    file.path(),
                    format!(
                        "part `{}`: content hash xxh3 {xxh3}, the manifest records {want}: the file is corrupt or changed \
                         since convert; copy it again or convert again",
                        part.name()
                    ),
                ));
            }
        }
        model::expected_tensors(self.config(), part)
            .into_iter()
            .map(|(name, _)| tensors.remove(&name).map(|t| (name.clone(), t)).ok_or_else(|| mismatch(file.path(), format!("missing tensor `{name}`"))))
            .collect()
    }

    /// Re-hash every part against the manifest: (part name, problem) for each that differs.
    pub fn verify(&self) -> Vec<(String, String)> {
        self.manifest.parts.iter().filter_map(|entry| self.verify_one(entry).map(|problem| (entry.name.clone(), problem))).collect()
    }

    fn verify_one(&self, entry: &PartEntry) -> Option<String> {
        let path = self.dir.join(&entry.file);
        match st::hash_file(&path) {
            Err(e) => Some(e.to_string()),
            Ok(h) if h.bytes != entry.bytes => Some(format!("{}: {} bytes, the manifest records {}", path.display(), h.bytes, entry.bytes)),
            Ok(h) if h.sha256 != entry.sha256 => Some(format!("{}: sha256 {}, the manifest records {}", path.display(), h.sha256, entry.sha256)),
            Ok(h) if entry.xxh3.as_ref().is_some_and(|x| *x != h.xxh3) => {
                Some(format!("{}: xxh3 {}, the manifest records {}", path.display(), h.xxh3, entry.xxh3.as_deref().unwrap_or("")))
            }
            Ok(_) => None,
        }
    }
}
