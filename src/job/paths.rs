//! What the score job's paths must be before any work: the corpus, the results file and the
//! CSV three different files (a CSV written over the results, or results over the corpus,
//! destroys them); the results file locked for this job; the CSV's directory made and
//! writable, so a run does not end after hours of work unable to write it.

use std::path::{Path, PathBuf};

use thiserror::Error;

use super::output_lock::{LockError, OutputLock};

#[derive(Debug, Error)]
pub enum PathError {
    #[error("{a} {path_a} and {b} {path_b} are the same file; expected different files (writing {b} would destroy {a})")]
    Same { a: &'static str, path_a: String, b: &'static str, path_b: String },
    #[error("--csv {csv}: {what}: {source}")]
    Csv {
        csv: String,
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Lock(#[from] LockError),
}

/// What identifies a file: its inode when it exists, else its canonical directory and name
/// (links and `./` spellings of one file compare equal either way).
#[derive(PartialEq, Eq, Debug)]
enum FileKey {
    Inode(u64, u64),
    Path(PathBuf),
}

fn key(p: &Path) -> FileKey {
    use std::os::unix::fs::MetadataExt;
    if let Ok(m) = std::fs::metadata(p) {
        return FileKey::Inode(m.dev(), m.ino());
    }
    let dir = p.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    FileKey::Path(dir.join(p.file_name().unwrap_or_default()))
}

/// Refuse a corpus, results file and CSV that are not three different files (a usage error).
pub fn check_distinct(docs: &Path, out: &Path, csv: Option<&Path>) -> Result<(), PathError> {
    let same = |a: &'static str, pa: &Path, b: &'static str, pb: &Path| {
        if key(pa) == key(pb) {
            Err(PathError::Same { a, path_a: pa.display().to_string(), b, path_b: pb.display().to_string() })
        } else {
            Ok(())
        }
    };
    same("--docs", docs, "--out", out)?;
    if let Some(csv) = csv {
        same("--out", out, "--csv", csv)?;
        same("--docs", docs, "--csv", csv)?;
    }
    Ok(())
}

/// Make the CSV's directory and check it can be written, before any weight is read.
pub fn check_csv_dir(csv: &Path) -> Result<(), PathError> {
    let err = |what: &str, source| PathError::Csv { csv: csv.display().to_string(), what: what.to_string(), source };
    if csv.is_dir() {
        return Err(err("is a directory, expected a file path", std::io::Error::from(std::io::ErrorKind::IsADirectory)));
    }
    let dir = csv.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| err(&format!("cannot make its directory {}", dir.display()), e))?;
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).map_err(|_| err("bad path", std::io::Error::from(std::io::ErrorKind::InvalidInput)))?;
    // SAFETY: access only reads the NUL-terminated path.
    if unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) } != 0 {
        return Err(err(&format!("its directory {} is not writable", dir.display()), std::io::Error::last_os_error()));
    }
    Ok(())
}

/// The writer's claim on its outputs, made at the start of the prepare step: the results
/// file's lock (see OutputLock::acquire for `batch_job`), and the CSV's directory.
pub fn claim_outputs(out: &Path, csv: Option<&Path>, batch_job: Option<String>) -> Result<OutputLock, PathError> {
    let lock = OutputLock::acquire(out, batch_job)?;
    if let Some(csv) = csv {
        check_csv_dir(csv)?;
    }
    Ok(lock)
}
