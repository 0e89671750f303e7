//! The tiny llama_tied fixture as a model directory, corpora of its vocabulary, and the
//! processes of a running job, for the tests that launch short score jobs.

use super::proc::OutputWithin;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

pub use super::proc::bin;

/// llama_tied converted into `dir`/model (its byte-level BPE reads "t3 t17 ..." too).
pub fn model(dir: &Path) -> PathBuf {
    let out = dir.join("model");
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama_tied");
    let o = bin().args(["convert", "--from"]).arg(&fixture).arg("--to").arg(&out).output_within(Duration::from_secs(120)).expect("convert");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    out
}

/// One document line of the fixture's vocabulary.
pub fn doc_line(i: usize) -> String {
    let words: Vec<String> = (0..(5 + i % 11)).map(|k| format!("t{}", 3 + (i * 7 + k * 13) % 90)).collect();
    let choices: Vec<String> = (0..3).map(|c| format!("t{} t{}", 3 + (i + c * 31) % 90, 3 + (i * 3 + c) % 90)).collect();
    serde_json::json!({"id": format!("d{i}"), "prompt": words.join(" "), "choices": choices}).to_string()
}

/// `n` good documents in `dir`/`name`.
pub fn corpus(dir: &Path, name: &str, n: usize) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, (0..n).map(doc_line).collect::<Vec<_>>().join("\n") + "\n").unwrap();
    p
}

/// `mpirun --oversubscribe -np N`, with `env` passed to the ranks.
pub fn mpirun(np: usize, env: &[(&str, &str)]) -> Command {
    let mut c = Command::new("mpirun");
    c.args(["--oversubscribe", "-np", &np.to_string()]);
    for (k, v) in env {
        c.args(["-x", &format!("{k}={v}")]);
    }
    c.env("OMPI_ALLOW_RUN_AS_ROOT", "1").env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1").env("HDF5_USE_FILE_LOCKING", "FALSE");
    c
}

/// The pid of the job writing `out`, from its lock file, once there is one.
pub fn writer_pid(out: &Path) -> Option<i32> {
    let mut lock = out.as_os_str().to_owned();
    lock.push(".lock");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(PathBuf::from(lock)).ok()?).ok()?;
    v.get("pid")?.as_i64().map(|p| p as i32)
}

/// The parent pid of `pid`.
fn ppid(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..].split_whitespace().nth(1)?.parse().ok()
}

/// Every running process whose parent is `pid`.
pub fn children(pid: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return vec![] };
    entries.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok()).filter(|&p| ppid(p) == Some(pid)).collect()
}

/// The name of process `pid`'s program.
pub fn comm(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default().trim().to_string()
}

pub fn signal(pid: i32, sig: i32) {
    // SAFETY: kill only sends a signal, to a process this test started.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// Documents in a results file now, 0 while it cannot be read (being made or written).
pub fn docs_in(out: &Path) -> usize {
    falcon_batch::results::read_results(out).map(|r| r.len()).unwrap_or(0)
}
