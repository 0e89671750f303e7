//! Typed HDF5 access the results file is built from: strings, scalar attributes, extendable
//! 1-D datasets and reading their prefixes.

use hdf5::types::VarLenUnicode;
use hdf5::{Dataset, File, Group, H5Type, Location};

use super::schema::DOC_CHUNK;
use super::{At, ResultsError};

/// A string as the file stores it: an HDF5 string ends at a NUL, so a NUL becomes U+FFFD.
/// The corpus refuses NUL in ids and choices, so this only touches messages and templates;
/// what is compared with the file (identity, record_check) is compared in this form.
pub(crate) fn stored(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains('\0') {
        std::borrow::Cow::Owned(s.replace('\0', "\u{FFFD}"))
    } else {
        std::borrow::Cow::Borrowed(s)
    }
}

pub(super) fn vlu(s: &str) -> VarLenUnicode {
    // Cannot fail: `stored` leaves no NUL, the only thing VarLenUnicode refuses.
    stored(s).parse().unwrap_or_default()
}

pub(super) fn int32(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// Create or replace a string attribute of `loc` (the file, a group or a dataset).
pub(super) fn set_str_attr(loc: &Location, name: &str, value: &str, path: &str) -> Result<(), ResultsError> {
    let what = format!("writing attribute {name}");
    if loc.attr(name).is_ok() {
        loc.delete_attr(name).at(path, &what)?;
    }
    let attr = loc.new_attr::<VarLenUnicode>().shape(()).create(name).at(path, &what)?;
    attr.write_scalar(&vlu(value)).at(path, &what)
}

pub(super) fn read_str_attr(file: &File, name: &str) -> Option<String> {
    let attr = file.attr(name).ok()?;
    attr.read_scalar::<VarLenUnicode>().ok().map(|v| v.as_str().to_string())
}

/// An empty extendable dataset. With `checksum` its chunks carry a Fletcher32 checksum,
/// which HDF5 checks on every read: a changed byte in the data is a read error, not a
/// wrong value. HDF5 (1.10) takes no filter on variable-length strings: those are covered
/// by `/docs/record_check`, as is every other field.
pub(super) fn create_set<T: H5Type>(group: &Group, name: &str, chunk: usize, checksum: bool, path: &str) -> Result<Dataset, ResultsError> {
    let b = group.new_dataset::<T>();
    let b = b.chunk(chunk).shape(0..);
    let b = if checksum { b.fletcher32() } else { b };
    b.create(name).at(path, &format!("creating {name}"))
}

/// Resize `ds` to hold `data` after its first `at` rows and write it there.
pub(super) fn extend<T: H5Type>(ds: &Dataset, at: usize, data: &[T], path: &str) -> Result<(), ResultsError> {
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
                crate::warn!("{}: unreadable from row {}: {e}", ds.name(), out.len());
                break;
            }
        }
    }
    out
}

/// Every element of a 1-D dataset in a file closed cleanly: a failed read (a checksum that
/// does not match, an unreadable heap) is damage, named by dataset.
pub(super) fn read_whole<T: H5Type + Clone>(ds: &Dataset, path: &str) -> Result<Vec<T>, ResultsError> {
    ds.read_raw::<T>().map_err(|source| ResultsError::DamagedHdf5 { path: path.to_string(), at: ds.name(), what: "cannot be read", source })
}

/// The first `n` elements of a 1-D dataset.
pub(super) fn read_prefix<T: H5Type + Clone>(ds: &Dataset, n: usize, path: &str) -> Result<Vec<T>, ResultsError> {
    if n == 0 {
        return Ok(Vec::new());
    }
    Ok(ds.read_slice_1d::<T, _>(0..n).at(path, &format!("reading {}", ds.name()))?.to_vec())
}

/// A dataset of the schema; one that cannot be opened (its header damaged, or missing) is
/// damage to the file, named by its path.
pub(super) fn dataset(group: &Group, name: &str, path: &str) -> Result<Dataset, ResultsError> {
    group.dataset(name).map_err(|source| ResultsError::DamagedHdf5 {
        path: path.to_string(),
        at: format!("{}/{name}", group.name()),
        what: "cannot be opened",
        source,
    })
}
