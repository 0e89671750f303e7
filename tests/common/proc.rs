//! Launching processes from tests with a hard limit.
//!
//! Every command runs under `timeout -k 5 LIMIT` in a process group of its own, with its
//! output going to files rather than pipes: a test once waited 395 s on pipes held open by
//! orphans of a killed mpirun job. When the test is done with it (or panics), the whole group
//! is killed, so nothing it started outlives the test.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// A finished command.
pub struct Ran {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub took: Duration,
    /// Whether `timeout` had to end it: it ran to its limit.
    pub timed_out: bool,
}

impl Ran {
    /// stdout then stderr, for assertion messages and searching.
    pub fn text(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }

    pub fn success(&self) -> bool {
        self.status.success()
    }

    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

}

/// A command running under its limit; dropping it kills its process group.
pub struct Running {
    child: Child,
    pgid: i32,
    out: tempfile::NamedTempFile,
    err: tempfile::NamedTempFile,
    start: Instant,
    limit: Duration,
}

/// Start `cmd` under `timeout -k 5 LIMIT` in a new process group, stdin closed, output to
/// temporary files. The program, arguments, environment and directory are taken from `cmd`.
pub fn spawn_limited(cmd: &Command, limit: Duration) -> Running {
    let out = tempfile::NamedTempFile::new().expect("temp file for stdout");
    let err = tempfile::NamedTempFile::new().expect("temp file for stderr");
    let mut c = Command::new("timeout");
    c.args(["-k", "5"]).arg(format!("{:.1}", limit.as_secs_f64())).arg(cmd.get_program()).args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    if let Some(d) = cmd.get_current_dir() {
        c.current_dir(d);
    }
    c.stdin(Stdio::null())
        .stdout(out.reopen().expect("reopen stdout file"))
        .stderr(err.reopen().expect("reopen stderr file"))
        .process_group(0);
    let child = c.spawn().unwrap_or_else(|e| panic!("cannot start {:?}: {e}", cmd.get_program()));
    let pgid = child.id() as i32;
    Running { child, pgid, out, err, start: Instant::now(), limit }
}

/// Run `cmd` to its end or its limit (see spawn_limited).
pub fn run_limited(cmd: &Command, limit: Duration) -> Ran {
    spawn_limited(cmd, limit).wait()
}

impl Running {
    /// Wait for it to end (at most its limit plus the kill grace), then kill whatever is
    /// left of its process group.
    pub fn wait(mut self) -> Ran {
        let status = self.child.wait().expect("wait for the launched command");
        let took = self.start.elapsed();
        self.kill_group();
        let read = |f: &tempfile::NamedTempFile| {
            let mut s = String::new();
            let _ = f.reopen().and_then(|mut r| r.read_to_string(&mut s));
            s
        };
        // timeout exits 124, or 137 when it had to kill; a command may exit so too by itself
        // (mpirun does 137 for a rank killed by SIGKILL), so the clock decides.
        let timed_out = took >= self.limit && matches!(status.code(), Some(124) | Some(137));
        Ran { status, stdout: read(&self.out), stderr: read(&self.err), took, timed_out }
    }

    /// The pid of what was started (`timeout`, whose child is the command).
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// What it has written to stderr so far.
    pub fn stderr_so_far(&self) -> String {
        std::fs::read_to_string(self.err.path()).unwrap_or_default()
    }

    /// Wait until its stderr contains `needle` (true), or it ends or `within` passes (false).
    pub fn wait_for_stderr(&mut self, needle: &str, within: Duration) -> bool {
        let until = Instant::now() + within;
        while Instant::now() < until && self.start.elapsed() < self.limit {
            if self.stderr_so_far().contains(needle) {
                return true;
            }
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return self.stderr_so_far().contains(needle);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    fn kill_group(&mut self) {
        // SAFETY: killpg only sends a signal; the group is the one this command leads.
        unsafe {
            libc::killpg(self.pgid, libc::SIGKILL);
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.kill_group();
        let _ = self.child.wait();
    }
}

/// `Command::output` with a hard limit, for tests that want a plain `Output`.
pub trait OutputWithin {
    /// Runs as spawn_limited does; Err(NotFound) when the program cannot be found (so a
    /// test can tell "not installed" from "failed").
    fn output_within(&mut self, limit: Duration) -> std::io::Result<Output>;
}

impl OutputWithin for Command {
    fn output_within(&mut self, limit: Duration) -> std::io::Result<Output> {
        let program = std::path::Path::new(self.get_program());
        let found = if program.components().count() > 1 {
            program.exists()
        } else {
            std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
        };
        if !found {
            return Err(std::io::Error::new(std::io::ErrorKind::NotFound, format!("{} not found", program.display())));
        }
        let r = run_limited(self, limit);
        Ok(Output { status: r.status, stdout: r.stdout.into_bytes(), stderr: r.stderr.into_bytes() })
    }
}

/// How long [`run`] lets one command of the binary take before killing its process group.
pub const RUN_LIMIT: Duration = Duration::from_secs(300);

/// The falcon-batch binary of this build. HDF5 file locking is off: test directories may
/// be on file systems without it.
pub fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_falcon-batch"));
    c.env("HDF5_USE_FILE_LOCKING", "FALSE");
    c
}

/// Runs `c` to its end under [`RUN_LIMIT`] (see spawn_limited).
pub fn run(c: &mut Command) -> Output {
    c.output_within(RUN_LIMIT).expect("run falcon-batch")
}
