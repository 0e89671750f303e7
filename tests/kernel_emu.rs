//! The CUDA kernels' logic on the CPU: scripts/kernel_emu/run.sh compiles kernels/*.cu with
//! g++ against a small emulation of the CUDA subset they use (a std::thread per CUDA
//! thread, barriers for __syncthreads and shuffles, the portable mma the flash attention
//! kernel falls back to without sm_80) and checks them against dense references: flash
//! attention on packed token trees (GQA groups of 3 and 29, zero-padded head dims, masked
//! tiles skipped, extract's branch rows over a kept prompt and kept paths), norms, log-softmax, rope, gathers, bf16 rounding (bit for bit the CPU bf16
//! compute route's). Without g++ it prints "skipped" and passes.

#[test]
fn kernels_match_dense_references_in_the_cpu_emulator() {
    if std::process::Command::new("g++").arg("--version").output().is_err() {
        println!("skipped: no g++ to build scripts/kernel_emu");
        return;
    }
    let root = env!("CARGO_MANIFEST_DIR");
    let tmp = std::env::temp_dir().join(format!("fb-kernel-emu-{}", std::process::id()));
    let out = std::process::Command::new("sh")
        .arg(format!("{root}/scripts/kernel_emu/run.sh"))
        .env("TMPDIR", &tmp)
        .output()
        .expect("running scripts/kernel_emu/run.sh");
    let _ = std::fs::remove_dir_all(&tmp);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{text}");
    assert!(out.status.success(), "kernel emulator failed:\n{text}");
    assert_eq!(text.matches("flash_attention").count(), 4, "every attention case ran:\n{text}");
    // The device's f32 -> bf16 cast rounds as the CPU's bf16 compute route rounds (its GEMM
    // inputs and the outputs it keeps rounded): the same bits for drive_misc.cpp's values.
    let line = text.lines().find_map(|l| l.strip_prefix("bf16 bits: ")).expect("the emulator prints its bf16 bits");
    let device: Vec<&str> = line.split_whitespace().take(5).collect();
    let cpu: Vec<String> = [1.0f32, 3.14159, -2.5e-3, 65504.0, 1.00390625]
        .iter()
        .map(|&v| format!("{:04x}", falcon_batch::backend::cpu::round_bf16(v).to_bits() >> 16))
        .collect();
    assert_eq!(device, cpu, "device bf16 rounding vs the CPU route's");
}
