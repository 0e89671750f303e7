//! Recovering a file whose writer was killed before closing it: the end of allocation moved
//! to the end of the file, then the whole documents rewritten into a fresh file.

use std::collections::HashSet;
use std::path::Path;

use hdf5::File;

use super::h5::read_str_attr;
use super::schema::{build_empty, closed_cleanly, tmp_path};
use super::writer::ResultsWriter;
use super::{At, ResultsError, RunMeta};

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

/// Rewrite the whole documents of a file into a new file (temporary name, then renamed
/// over it), leaving out those whose id is in `drop`; returns how many were kept. Used for a
/// file that was not closed cleanly and to drop the records a resume scores again.
pub(super) fn rebuild(path: &Path, meta: &RunMeta, drop: &HashSet<String>) -> Result<usize, ResultsError> {
    let name = path.display().to_string();
    let closed = File::open(path).is_ok_and(|f| closed_cleanly(&f));
    if !closed {
        extend_eoa(path)?;
    }
    let mut docs = super::read_results(path).map_err(|e| match e {
        e @ ResultsError::Damaged { .. } => e,
        e => ResultsError::Corrupt {
            path: name.clone(),
            msg: format!("the last writer did not close the file and it cannot be read back ({e}); pass --overwrite to start again"),
        },
    })?;
    docs.retain(|d| !drop.contains(&d.id));
    let created = File::open(path).ok().and_then(|f| read_str_attr(&f, "created"));
    let tmp = tmp_path(path);
    let result = (|| {
        build_empty(&tmp, meta, created.as_deref())?;
        let (mut w, _) = ResultsWriter::resume(&tmp, meta, &HashSet::new())?;
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
