//! A corpus that can be read only once (`--docs -`, a pipe, /dev/stdin, `<(...)`) is copied
//! to a temporary regular file first: the job reads its corpus more than once (the progress
//! display counts its documents; the reader then reads them), and a second read of a pipe
//! finds it dry, which once made "scored 0/104, exit 0".

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use super::CorpusError;

/// A corpus copied to `path`, removed when dropped.
#[derive(Debug)]
pub struct Spooled {
    path: PathBuf,
}

impl Spooled {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Spooled {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// True for `-` (standard input) and for anything that is not a regular file or directory
/// (pipes, character devices, sockets), which cannot be read twice.
pub fn reads_once(docs: &Path) -> bool {
    if docs.as_os_str() == "-" {
        return true;
    }
    std::fs::metadata(docs).is_ok_and(|m| !m.is_file() && !m.is_dir())
}

/// Copy the corpus at `docs` (`-`: standard input) into a new file in `dir`.
pub fn spool(docs: &Path, dir: &Path) -> Result<Spooled, CorpusError> {
    let name = docs.display().to_string();
    let path = dir.join(format!("falcon-batch-corpus-{}.jsonl", std::process::id()));
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| CorpusError::Io { path, source }
    };
    let file = OpenOptions::new().write(true).create_new(true).open(&path).map_err(io(&path))?;
    // From here on the file is ours to remove, whatever fails next.
    let spooled = Spooled { path };
    let mut writer = BufWriter::with_capacity(1 << 20, file);
    let copied = if docs.as_os_str() == "-" {
        std::io::copy(&mut std::io::stdin().lock(), &mut writer)
    } else {
        File::open(docs).and_then(|mut f| std::io::copy(&mut f, &mut writer))
    };
    copied.map_err(io(Path::new(&name)))?;
    writer.flush().map_err(io(&spooled.path))?;
    Ok(spooled)
}
