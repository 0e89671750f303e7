//! Printing to stdout that stops quietly when its reader goes away (`show … | head`).
//!
//! Rust ignores SIGPIPE, so a write to a closed pipe fails with EPIPE and `println!` panics
//! (exit 101). Restoring SIGPIPE's default would also kill an MPI rank whose peer socket
//! closes, so the commands print through here instead: a closed stdout becomes
//! [`OutError::Closed`], which main ends with exit 0 and no message, as `cat` would.

use falcon_batch::job::JobError;
use std::io::Write;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum OutError {
    /// The reader of stdout is gone; nothing is wrong with the command's work.
    #[error("stdout was closed by its reader")]
    Closed,
    #[error("cannot write to stdout: {0}")]
    Io(std::io::Error),
}

/// Writes `args` to stdout and flushes, so a closed pipe is noticed at the line that met it.
pub fn print(args: std::fmt::Arguments) -> Result<(), OutError> {
    let mut out = std::io::stdout().lock();
    out.write_fmt(args).and_then(|_| out.flush()).map_err(OutError::from)
}

impl From<std::io::Error> for OutError {
    fn from(e: std::io::Error) -> OutError {
        match e.kind() {
            std::io::ErrorKind::BrokenPipe => OutError::Closed,
            _ => OutError::Io(e),
        }
    }
}

/// `println!` that returns [`OutError`] instead of panicking.
#[macro_export]
macro_rules! outln {
    () => { $crate::cli::out::print(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::cli::out::print(format_args!("{}\n", format_args!($($arg)*))) };
}

/// Whether `e` is stdout closed by its reader (exit 0, quietly): here, or in a job's output.
pub fn is_closed(e: &anyhow::Error) -> bool {
    let job_closed = |c: &(dyn std::error::Error + 'static)| {
        matches!(c.downcast_ref::<JobError>(), Some(JobError::Stdout(io)) if io.kind() == std::io::ErrorKind::BrokenPipe)
    };
    e.chain().any(|c| matches!(c.downcast_ref::<OutError>(), Some(OutError::Closed)) || job_closed(c))
}
