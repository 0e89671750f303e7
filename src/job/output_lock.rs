//! One job per results file: `<out>.lock` beside the output, made before the results file is
//! opened or replaced (`--overwrite` included).
//!
//! HDF5's own lock is no answer: it is off where it cannot work (HDF5_USE_FILE_LOCKING=FALSE,
//! common on Lustre and NFS), and where it works its error reads like a foreign file, whose
//! advice (`--overwrite`) destroys the running job's work. So the lock is a plain file made
//! with O_CREAT|O_EXCL, which is atomic on local file systems, NFSv3+ and Lustre, naming its
//! holder (host, pid, start time, command line) for the message a second job prints.
//!
//! A lock is stale when its holder is gone: on this host, its pid no longer runs the process
//! that took it (the kernel's start tick differs, so a reused pid is not mistaken for it); on
//! another host, whose processes cannot be seen from here, its mtime is older than
//! [`STALE_AFTER`], which the holder's heartbeat keeps fresh, or it names the same batch job
//! as this process (a requeued Slurm job starts only once every process of its previous run
//! has ended, possibly on another node, seconds after a SIGKILL left the lock behind). A stale
//! lock is taken over by
//! renaming a fresh one over it, after reading it again, and confirming after a pause that the
//! lock names this process: of two takers racing, the later rename wins and the earlier one
//! sees it. The heartbeat checks the lock still names its holder and says so when it does not.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// How often the holder refreshes the lock's mtime.
const HEARTBEAT: Duration = Duration::from_secs(10);
/// A lock from another host not refreshed for this long belongs to a dead job.
pub const STALE_AFTER: Duration = Duration::from_secs(120);
/// A lock file too new to hold its JSON yet is being written by its creator, not stale.
const BEING_WRITTEN: Duration = Duration::from_secs(10);
/// Between a take-over's rename and its check that the lock names this process.
const SETTLE: Duration = Duration::from_millis(300);

#[derive(Debug, Error)]
pub enum LockError {
    #[error("{} is being written by pid {} on host {} since {} ({}); wait for it or stop it (its lock: {})", .0.out, .0.holder.pid, .0.holder.host, .0.holder.since, .0.holder.cmdline, .0.lock)]
    Held(Box<Held>),
    #[error("{out}: another job is starting on it ({lock} was made {age_s} s ago); wait for it or stop it")]
    Starting { out: String, lock: String, age_s: u64 },
    #[error("{lock}: cannot {what}: {source}")]
    Io {
        lock: String,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Who holds the lock of which output.
#[derive(Debug)]
pub struct Held {
    out: String,
    lock: String,
    holder: Holder,
}

/// What the lock file holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Holder {
    host: String,
    pid: u32,
    /// Start of the job, RFC 3339 UTC.
    since: String,
    /// Field 22 of /proc/PID/stat: tells this process from a later one with the same pid.
    start_tick: u64,
    cmdline: String,
    /// The batch job (Slurm's job id) the holder ran in, if any.
    #[serde(default)]
    batch_job: Option<String>,
}

impl Holder {
    fn me(batch_job: Option<String>) -> Holder {
        let pid = std::process::id();
        Holder {
            host: this_host(),
            pid,
            since: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            start_tick: start_tick(pid).unwrap_or(0),
            cmdline: std::env::args().collect::<Vec<_>>().join(" "),
            batch_job,
        }
    }

    /// Whether the process that wrote this lock may still be running (`me` is this process).
    fn alive(&self, lock_age: Duration, me: &Holder) -> bool {
        if self.batch_job.is_some() && self.batch_job == me.batch_job {
            // An earlier run of this same batch job: the scheduler ended it before this one.
            false
        } else if self.host == me.host {
            start_tick(self.pid).is_some_and(|t| t == self.start_tick)
        } else {
            lock_age < STALE_AFTER
        }
    }
}

fn this_host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "unknown".into())
}

/// The kernel's start time of `pid` in clock ticks, or None when no such process runs.
fn start_tick(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(19)?.parse().ok()
}

/// `<out>.lock`.
pub fn lock_path(out: &Path) -> PathBuf {
    let mut p = out.as_os_str().to_owned();
    p.push(".lock");
    PathBuf::from(p)
}

/// The lock, held until dropped.
pub struct OutputLock {
    path: PathBuf,
    me: Holder,
    stop: Arc<AtomicBool>,
    heartbeat: Option<JoinHandle<()>>,
}

impl OutputLock {
    /// Take the lock of `out` (making its directory), or say who holds it. `batch_job` is the
    /// scheduler's id of the batch job this process runs in (SLURM_JOB_ID), if any.
    pub fn acquire(out: &Path, batch_job: Option<String>) -> Result<OutputLock, LockError> {
        let path = lock_path(out);
        let name = path.display().to_string();
        let io = |what: &'static str| {
            let lock = name.clone();
            move |source| LockError::Io { lock, what, source }
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io("make its directory"))?;
        }
        let me = Holder::me(batch_job);
        let body = serde_json::to_vec_pretty(&me).map_err(|e| io("encode")(std::io::Error::other(e)))?;
        // Two rounds: the second follows a stale lock's removal by a racing taker.
        for _ in 0..2 {
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut f) => {
                    f.write_all(&body).and_then(|_| f.sync_all()).map_err(io("write"))?;
                    return Ok(OutputLock::held(path, me));
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io("create")(e)),
            }
            let Some((seen, holder, age)) = read(&path).map_err(io("read"))? else { continue };
            match holder {
                Some(h) if h.alive(age, &me) => return Err(held(out, &path, h)),
                None if age < BEING_WRITTEN => {
                    return Err(LockError::Starting { out: out.display().to_string(), lock: name, age_s: age.as_secs() });
                }
                _ => return take_over(out, path, me, &body, &seen),
            }
        }
        Err(io("create")(std::io::Error::other("it keeps appearing and disappearing")))
    }

    fn held(path: PathBuf, me: Holder) -> OutputLock {
        let stop = Arc::new(AtomicBool::new(false));
        let heartbeat = {
            let (path, me, stop) = (path.clone(), me.clone(), stop.clone());
            std::thread::Builder::new().name("output-lock".into()).spawn(move || heartbeat(&path, &me, &stop)).ok()
        };
        OutputLock { path, me, stop, heartbeat }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.heartbeat.take() {
            h.thread().unpark();
            let _ = h.join();
        }
        // Never remove a lock another job took over.
        if let Ok(Some((_, Some(h), _))) = read(&self.path) {
            if h == self.me {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

fn held(out: &Path, path: &Path, holder: Holder) -> LockError {
    LockError::Held(Box::new(Held { out: out.display().to_string(), lock: path.display().to_string(), holder }))
}

/// A lock file as read: its bytes, its holder when they parse, and its age.
type Seen = (Vec<u8>, Option<Holder>, Duration);

/// The lock as it is now; None when it vanished.
fn read(path: &Path) -> std::io::Result<Option<Seen>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let age = std::fs::metadata(path)?.modified()?.elapsed().unwrap_or(Duration::ZERO);
    Ok(Some((bytes.clone(), serde_json::from_slice(&bytes).ok(), age)))
}

/// Replace the stale lock whose bytes are `seen` with this process's.
fn take_over(out: &Path, path: PathBuf, me: Holder, body: &[u8], seen: &[u8]) -> Result<OutputLock, LockError> {
    let name = path.display().to_string();
    let io = |what: &'static str| {
        let lock = name.clone();
        move |source| LockError::Io { lock, what, source }
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.{}", me.host, me.pid));
    let tmp = PathBuf::from(tmp);
    let mut f = File::create(&tmp).map_err(io("write a replacement"))?;
    f.write_all(body).and_then(|_| f.sync_all()).map_err(io("write a replacement"))?;
    drop(f);
    // Someone else took it over since it was read: theirs is live, not stale.
    match read(&path).map_err(io("read"))? {
        Some((now, holder, _)) if now != seen => {
            let _ = std::fs::remove_file(&tmp);
            return match holder {
                Some(h) => Err(held(out, &path, h)),
                None => Err(io("take over")(std::io::Error::other("another job is taking it over"))),
            };
        }
        _ => {}
    }
    std::fs::rename(&tmp, &path).map_err(io("take over"))?;
    std::thread::sleep(SETTLE);
    match read(&path).map_err(io("read"))? {
        Some((_, Some(h), _)) if h == me => {
            crate::warn!("{}: took over the lock of a job that is gone", path.display());
            Ok(OutputLock::held(path, me))
        }
        Some((_, Some(h), _)) => Err(held(out, &path, h)),
        _ => Err(io("take over")(std::io::Error::other("it vanished while being taken over"))),
    }
}

/// Keep the lock's mtime fresh for other hosts; stop when told, or when the lock no longer
/// names this process (then say so: another job writes the same file).
fn heartbeat(path: &Path, me: &Holder, stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        std::thread::park_timeout(HEARTBEAT);
        if stop.load(Ordering::SeqCst) {
            return;
        }
        match read(path) {
            Ok(Some((_, Some(h), _))) if h == *me => {
                if let Ok(f) = File::options().append(true).open(path) {
                    let _ = f.set_modified(SystemTime::now());
                }
            }
            _ => {
                crate::warn!("{}: this job's lock was removed or taken over; another job may be writing the same output", path.display());
                return;
            }
        }
    }
}
