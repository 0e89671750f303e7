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

    /// Cheap start-up check of just these parts: sizes, headers, names, shapes, dtype.
    pub fn check_parts(&self, parts: &[Part]) -> Result<()> {
        parts.iter().try_for_each(|&p| self.open_part(p).map(|_| ()))
    }

    /// The tensors of one part under their short names, in the family table's order.
    pub fn read_part(&self, part: Part) -> Result<Vec<(String, HostTensor)>> {
        let file = self.open_part(part)?;
        model::expected_tensors(self.config(), part)
            .into_iter()
            .map(|(name, _)| {
                let t = file.read(&name)?;
                crate::liveness::advanced();
                Ok((name, t))
            })
            .collect()
    }

    /// Re-hash every part against the manifest: (part name, problem) for each that differs.
    pub fn verify(&self) -> Vec<(String, String)> {
        self.manifest.parts.iter().filter_map(|entry| self.verify_one(entry).map(|problem| (entry.name.clone(), problem))).collect()
    }

    fn verify_one(&self, entry: &PartEntry) -> Option<String> {
        let path = self.dir.join(&entry.file);
        match st::sha256_file(&path) {
            Err(e) => Some(e.to_string()),
            Ok((bytes, _)) if bytes != entry.bytes => Some(format!("{}: {bytes} bytes, the manifest records {}", path.display(), entry.bytes)),
            Ok((_, sha)) if sha != entry.sha256 => Some(format!("{}: sha256 {sha}, the manifest records {}", path.display(), entry.sha256)),
            Ok(_) => None,
        }
    }
}
