//! Test directories under the system temp dir, `<tag>-<pid>`: emptied when made and removed
//! when the test process exits, so a `make test` leaves nothing behind (the converted SmolLM2
//! copies alone were 0.6 GB per suite per run). FB_KEEP_TEST_DIRS=1 keeps them, to look
//! at after a failure.

use std::path::PathBuf;
use std::sync::{Mutex, Once};

static MADE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

extern "C" fn remove_made() {
    if std::env::var_os("FB_KEEP_TEST_DIRS").is_some() {
        return;
    }
    for d in MADE.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// A fresh, empty `<temp>/<tag>-<pid>` (what a previous run left there is removed), removed
/// again at exit.
pub fn dir(tag: &str) -> PathBuf {
    static AT_EXIT: Once = Once::new();
    // SAFETY: remove_made is an extern "C" fn that neither unwinds nor calls exit.
    AT_EXIT.call_once(|| unsafe {
        libc::atexit(remove_made);
    });
    let d = std::env::temp_dir().join(format!("{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("create {}: {e}", d.display()));
    MADE.lock().unwrap_or_else(|e| e.into_inner()).push(d.clone());
    d
}
