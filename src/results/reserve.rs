//! Space held on the output's file system for the next append, so that a full disk stops
//! the job between two batches, with the file whole, instead of inside HDF5's write.
//!
//! HDF5 (1.10) updates its metadata in place: when a write fails half way for lack of
//! space, blocks already on disk are rewritten but the new ones they point to are not, and
//! documents flushed in earlier batches become unreadable (seen on a full tmpfs: ~120 of
//! 630 lost). So before each append the writer makes sure the reserve file beside the
//! output holds more than that append can need, then empties it, so the append always has
//! that room; afterwards it takes the room back. A full disk (or quota) shows up as the
//! reserve failing to grow, before anything is written.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The smallest reserve: more than HDF5 allocates for metadata in one append.
pub(super) const MIN_RESERVE: u64 = 1 << 20;

pub(super) struct Reserve {
    path: PathBuf,
    file: File,
    held: u64,
}

/// True for the errors that mean the file system (or the user's quota) is full.
pub(super) fn is_no_space(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

impl Reserve {
    /// `<output>.reserve`, beside the output so it is on the same file system.
    pub fn path_for(output: &Path) -> PathBuf {
        let mut p = output.as_os_str().to_owned();
        p.push(".reserve");
        PathBuf::from(p)
    }

    /// Open (or take over a killed run's) reserve file, holding nothing yet.
    pub fn open(output: &Path) -> std::io::Result<Reserve> {
        let path = Reserve::path_for(output);
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path)?;
        Ok(Reserve { path, file, held: 0 })
    }

    /// Hold at least `bytes` (really allocated, not a sparse hole).
    pub fn hold(&mut self, bytes: u64) -> std::io::Result<()> {
        if self.held >= bytes {
            return Ok(());
        }
        let len = libc::off_t::try_from(bytes).map_err(|_| std::io::Error::other("reserve size too large"))?;
        // SAFETY: the descriptor belongs to `self.file`, open for writing, for the whole call.
        let rc = unsafe { libc::posix_fallocate(std::os::fd::AsRawFd::as_raw_fd(&self.file), 0, len) };
        match rc {
            0 => {}
            // A file system without fallocate: write the bytes instead.
            libc::EOPNOTSUPP | libc::EINVAL => self.write_zeros(bytes)?,
            errno => {
                // Give back what a partial allocation took.
                let _ = self.file.set_len(0);
                self.held = 0;
                return Err(std::io::Error::from_raw_os_error(errno));
            }
        }
        self.held = bytes;
        Ok(())
    }

    fn write_zeros(&mut self, bytes: u64) -> std::io::Result<()> {
        use std::io::Seek;
        self.file.seek(std::io::SeekFrom::Start(self.held))?;
        let block = vec![0u8; 1 << 16];
        let mut left = bytes - self.held;
        while left > 0 {
            let n = left.min(block.len() as u64) as usize;
            if let Err(e) = self.file.write_all(&block[..n]) {
                let _ = self.file.set_len(0);
                self.held = 0;
                return Err(e);
            }
            left -= n as u64;
        }
        self.file.sync_data()
    }

    /// Give the held space back to the file system, for the append to use.
    pub fn release(&mut self) -> std::io::Result<()> {
        self.file.set_len(0)?;
        self.held = 0;
        Ok(())
    }

    /// Delete the reserve file (the writer is done).
    pub fn remove(self) {
        drop(self.file);
        let _ = std::fs::remove_file(&self.path);
    }
}
