//! The one channel for messages to the user on stderr: every line reads
//! `falcon-batch: [rank N: ][warning: |error: ]text`, each written whole in one write(2), so
//! that the lines of ranks sharing mpirun's output never interleave mid-line. Info lines are
//! silenced by `--quiet` (set once at start); warnings and errors always show.
//!
//! Use the macros: `info!("…")`, `warn!("…")`, `error!("…")`, each also as `info!(rank r; "…")`.

use std::fmt;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

/// Every line starts with this, so a user (or a script) can tell ours from mpirun's.
pub const PREFIX: &str = "falcon-batch: ";

static QUIET: AtomicBool = AtomicBool::new(false);

/// Silences (or not) the info lines of this process; called once, before the command runs.
pub fn set_quiet(quiet: bool) {
    QUIET.store(quiet, Ordering::Relaxed);
}

/// Whether info lines are silenced (a progress bar should not be drawn either).
pub fn is_quiet() -> bool {
    QUIET.load(Ordering::Relaxed)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Info,
    Warn,
    Error,
}

/// The text written for a message: each of its lines with the prefix (a message of several
/// lines keeps every line recognisable as ours), ending in a newline.
pub fn format_lines(level: Level, rank: Option<usize>, msg: fmt::Arguments) -> String {
    let mut head = String::from(PREFIX);
    if let Some(r) = rank {
        head.push_str(&format!("rank {r}: "));
    }
    head.push_str(match level {
        Level::Info => "",
        Level::Warn => "warning: ",
        Level::Error => "error: ",
    });
    let text = msg.to_string();
    let mut out = String::with_capacity(text.len() + head.len() + 1);
    for line in text.trim_end_matches('\n').split('\n') {
        out.push_str(&head);
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Writes one message (see the module doc); what the macros call.
pub fn emit(level: Level, rank: Option<usize>, msg: fmt::Arguments) {
    if level == Level::Info && is_quiet() {
        return;
    }
    let text = format_lines(level, rank, msg);
    // One buffer, one write: stderr is unbuffered, so a formatted eprintln! would go out in
    // pieces that another rank's pieces can land between. A failed write to stderr has
    // nowhere to be reported.
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}

/// An info line (silenced by `--quiet`): `info!("…")` or `info!(rank r; "…")`.
#[macro_export]
macro_rules! info {
    (rank $rank:expr; $($arg:tt)+) => {
        $crate::report::emit($crate::report::Level::Info, Some($rank), format_args!($($arg)+))
    };
    ($($arg:tt)+) => {
        $crate::report::emit($crate::report::Level::Info, None, format_args!($($arg)+))
    };
}

/// A warning (always shown): `warn!("…")` or `warn!(rank r; "…")`.
#[macro_export]
macro_rules! warn {
    (rank $rank:expr; $($arg:tt)+) => {
        $crate::report::emit($crate::report::Level::Warn, Some($rank), format_args!($($arg)+))
    };
    ($($arg:tt)+) => {
        $crate::report::emit($crate::report::Level::Warn, None, format_args!($($arg)+))
    };
}

/// An error line (always shown), for a failure reported without ending in `main`'s error.
#[macro_export]
macro_rules! error {
    (rank $rank:expr; $($arg:tt)+) => {
        $crate::report::emit($crate::report::Level::Error, Some($rank), format_args!($($arg)+))
    };
    ($($arg:tt)+) => {
        $crate::report::emit($crate::report::Level::Error, None, format_args!($($arg)+))
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_prefix_per_line_and_the_rank_once() {
        let s = format_lines(Level::Info, Some(1), format_args!("read {} parts", 3));
        assert_eq!(s, "falcon-batch: rank 1: read 3 parts\n");
        let s = format_lines(Level::Warn, None, format_args!("a\nb\n"));
        assert_eq!(s, "falcon-batch: warning: a\nfalcon-batch: warning: b\n");
        let s = format_lines(Level::Error, Some(0), format_args!("x"));
        assert_eq!(s, "falcon-batch: rank 0: error: x\n");
    }
}
