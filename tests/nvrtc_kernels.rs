//! Every kernels/*.cu file through NVRTC exactly as the CUDA backend compiles it (common.cuh
//! in front, the same options) for compute_90 (H100/H200), compute_80 and compute_75 (the portable mma), then, where
//! `FALCON_PTXAS` names a ptxas, through ptxas for the real architecture with -v, failing
//! on any register spill. Needs NVRTC but no driver or GPU: `scripts/nvrtc-check.sh` puts
//! the CUDA 13 NVRTC and ptxas wheels' libraries on the path. Where libnvrtc is not found
//! the test prints "skipped: no NVRTC" and passes (CI has no CUDA libraries).

use falcon_batch::backend::cuda::{compile_file, kernel_files};

#[test]
fn kernels_compile_with_nvrtc_and_ptxas_without_spills() {
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        println!("skipped: no NVRTC (libnvrtc.so.13 not on the library path; see scripts/nvrtc-check.sh)");
        return;
    }
    let ptxas = std::env::var_os("FALCON_PTXAS");
    let dir = std::env::temp_dir().join(format!("fb-nvrtc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut failures = vec![];
    for (major, minor) in [(9, 0), (8, 0), (7, 5)] {
        for (file, src, names) in kernel_files() {
            let ptx = match compile_file(file, src, major, minor) {
                Ok(p) => p.to_src(),
                Err(e) => {
                    failures.push(format!("{e}"));
                    continue;
                }
            };
            for name in *names {
                if !ptx.contains(&format!(".entry {name}(")) {
                    failures.push(format!("kernels/{file}: no entry {name} in the PTX for compute_{major}{minor}"));
                }
            }
            let Some(ptxas) = &ptxas else { continue };
            let path = dir.join(format!("{file}.sm{major}{minor}.ptx"));
            std::fs::write(&path, &ptx).unwrap();
            let out = std::process::Command::new(ptxas)
                .arg(format!("-arch=sm_{major}{minor}"))
                .arg("-v")
                .arg("-o")
                .arg(dir.join("out.cubin"))
                .arg(&path)
                .output()
                .expect("running FALCON_PTXAS");
            let log = String::from_utf8_lossy(&out.stderr);
            // One "ptxas info : Used N registers, ..." and one spill line per kernel.
            for line in log.lines().filter(|l| l.contains("registers") || l.contains("spill")) {
                println!("PTXAS sm_{major}{minor} {file}: {}", line.trim());
            }
            if !out.status.success() {
                failures.push(format!("ptxas sm_{major}{minor} kernels/{file}:\n{log}"));
            }
            for line in log.lines().filter(|l| l.contains("bytes spill stores")) {
                if !line.trim_start().starts_with("0 bytes spill stores") && !line.contains(" 0 bytes spill stores") {
                    failures.push(format!("ptxas sm_{major}{minor} kernels/{file} spills registers: {}", line.trim()));
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    println!("NVRTC compiled {} kernel files for compute_90, compute_80 and compute_75", kernel_files().len());
}
