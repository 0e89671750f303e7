//! The output file system filling up mid-run, on a real (small) tmpfs: a clear error naming
//! the file, exit 1, the HDF5 file readable with every document reported finished, and the
//! same command resuming to the uninterrupted result once space is freed; the same for the
//! --csv file. Needs root to mount (CI runs as root): without it the test fails, it does
//! not skip.

use falcon_batch::results::read_results;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Every process this test starts is killed after 120 s (SIGKILL 5 s after the TERM).
fn limited(program: &str) -> Command {
    let mut c = Command::new("timeout");
    c.args(["-k", "5", "120", program]);
    c.env("HDF5_USE_FILE_LOCKING", "FALSE");
    c
}

fn bin() -> Command {
    limited(env!("CARGO_BIN_EXE_falcon-batch"))
}

fn run(c: &mut Command) -> Output {
    let o = c.output().expect("run a command");
    assert_ne!(o.status.code(), Some(124), "timed out after 120 s: {c:?}");
    o
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A tmpfs mounted for the test's lifetime; unmounted on drop, also when an assert fails.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let o = run(limited("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(dir));
        assert!(
            o.status.success(),
            "cannot mount a tmpfs at {} (this test needs root, as CI has): {}",
            dir.display(),
            stderr(&o)
        );
        Tmpfs { dir: dir.to_path_buf() }
    }

    fn resize(&self, size: &str) {
        let o = run(limited("mount").args(["-o", &format!("remount,size={size}")]).arg(&self.dir));
        assert!(o.status.success(), "cannot resize the tmpfs: {}", stderr(&o));
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = limited("umount").arg(&self.dir).status().is_ok_and(|s| s.success());
        if !ok {
            // Something still has a file open there: detach it now, it goes when closed.
            let _ = limited("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

fn model(dir: &Path) -> PathBuf {
    let out = dir.join("model");
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama_tied");
    let o = run(bin().args(["convert", "--from"]).arg(&fixture).arg("--to").arg(&out));
    assert!(o.status.success(), "{}", stderr(&o));
    out
}

/// n documents of the fixture's vocabulary: about 1.3 MB of HDF5 for 3000.
fn corpus(dir: &Path, n: usize) -> PathBuf {
    let mut lines = vec![];
    for i in 0..n {
        let words: Vec<String> = (0..(5 + i % 11)).map(|k| format!("t{}", 3 + (i * 7 + k * 13) % 90)).collect();
        let choices: Vec<String> = (0..3).map(|c| format!("t{} t{}", 3 + (i + c * 31) % 90, 3 + (i * 3 + c) % 90)).collect();
        lines.push(serde_json::json!({"id": format!("d{i}"), "prompt": words.join(" "), "choices": choices}).to_string());
    }
    let p = dir.join("corpus.jsonl");
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    p
}

fn score(model: &Path, docs: &Path, out: &Path, csv: &Path) -> Command {
    let mut c = bin();
    c.arg("score").arg("--model").arg(model).arg("--docs").arg(docs).arg("--out").arg(out).arg("--csv").arg(csv);
    c.args(["--batch-tokens", "40", "--wave", "1", "--quiet"]);
    c
}

/// The N of "the file holds the N documents finished so far".
fn kept(err: &str) -> usize {
    let rest = err.split("holds the ").nth(1).unwrap_or_else(|| panic!("no document count in: {err}"));
    rest.split(' ').next().and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("no document count in: {err}"))
}

/// Files in `dir` other than the given names (leftover temporaries, reserves).
fn others(dir: &Path, keep: &[&str]) -> Vec<String> {
    let names = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned());
    names.filter(|n| !keep.contains(&n.as_str())).collect()
}

/// Write a file until the file system is full, then give `free` bytes back.
fn fill(path: &Path, free: u64) {
    let mut f = std::fs::File::create(path).unwrap();
    let block = vec![0xa5u8; 4096];
    let mut written = 0u64;
    loop {
        match f.write(&block) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
    f.set_len(written.saturating_sub(free)).unwrap();
}

#[test]
fn full_disk_stops_cleanly_and_the_same_command_resumes() {
    let root = std::env::temp_dir().join(format!("fb-diskfull-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let (m, docs) = (model(&root), corpus(&root, 3000));

    // The reference: the same job on a disk with room.
    let (whole, whole_csv) = (root.join("whole.h5"), root.join("whole.csv"));
    let o = run(&mut score(&m, &docs, &whole, &whole_csv));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let reference = read_results(&whole).unwrap();
    assert_eq!(reference.len(), 3000);
    let reference_csv = std::fs::read(&whole_csv).unwrap();

    let fs = Tmpfs::mount(&root.join("mnt"), "1536k");
    let (out, csv) = (fs.dir.join("r.h5"), fs.dir.join("r.csv"));

    // 1. The disk fills mid-run: exit 1, a message naming the file and the cause.
    let o = run(&mut score(&m, &docs, &out, &csv));
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "a full disk is fatal: {err}");
    assert!(err.contains(&out.display().to_string()) && err.contains("no space left on device"), "{err}");
    assert!(err.contains("run the same command again"), "{err}");
    let n = kept(&err);
    assert!(n > 0 && n < 3000, "the disk must fill mid-run, not at {n} of 3000 documents");
    // Every document reported finished is in the file, whole and as the reference has it.
    let partial = read_results(&out).unwrap();
    assert_eq!(partial.len(), n, "documents in the file after the failure");
    assert_eq!(partial[..], reference[..n]);
    let dump = run(limited("h5dump").args(["-d", "/docs/status"]).arg(&out));
    assert!(dump.status.success(), "h5dump cannot read the file: {}", stderr(&dump));
    assert_eq!(others(&fs.dir, &["r.h5"]), Vec::<String>::new(), "no temporaries or reserve left behind");

    // 2. Space freed: the same command finishes the job, as if nothing had happened.
    fs.resize("10m");
    let o = run(&mut score(&m, &docs, &out, &csv));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(read_results(&out).unwrap(), reference, "resumed file differs from an uninterrupted run");
    assert_eq!(std::fs::read(&csv).unwrap(), reference_csv);

    // 3. The disk is full when the CSV is written: the error names the CSV, the old CSV and
    //    the results file stay whole, and no half CSV is left.
    let filler = fs.dir.join("filler");
    fill(&filler, 100 << 10);
    let o = run(&mut score(&m, &docs, &out, &csv));
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains(&csv.display().to_string()) && err.contains("No space left on device"), "{err}");
    assert!(err.contains("run the same command again"), "{err}");
    assert_eq!(std::fs::read(&csv).unwrap(), reference_csv, "the previous CSV is untouched");
    assert_eq!(read_results(&out).unwrap(), reference);
    assert_eq!(others(&fs.dir, &["r.h5", "r.csv", "filler"]), Vec::<String>::new());

    // 4. Freed again: the same command writes the CSV.
    std::fs::remove_file(&filler).unwrap();
    let o = run(&mut score(&m, &docs, &out, &csv));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(std::fs::read(&csv).unwrap(), reference_csv);

    drop(fs);
    let _ = std::fs::remove_dir_all(&root);
}
