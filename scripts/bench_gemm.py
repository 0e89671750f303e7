#!/usr/bin/env python3
"""GEMM microbenchmark (issue 12): falcon-batch's CPU `linear` (own packed GEMM; over f32, bf16 and
f16 weights) and the `gemm` crate (`falcon-batch bench --gemm`) against numpy/OpenBLAS sgemm, same shapes, same threads,
interleaved repeats, best kept, 1-minute load average recorded next to each repeat.

Shapes are (T, K, N): out (T, N) = x (T, K) · w (N, K)ᵀ; default SmolLM2-135M's at T = 512
(qkv, gate/up, down, lm head) and decode rows (T = 1, 4).

    /work/venv-bench/bin/python scripts/bench_gemm.py --threads 2 --repeats 3
"""
import argparse
import json
import os
import subprocess
import sys
import time

DEFAULT_SHAPES = "512x576x576,512x576x960,512x576x1536,512x1536x576,512x576x49152,2048x576x1536,1x576x1536,4x576x1536,1x576x49152"


def numpy_gflops(t, k, n, seconds=0.1):
    import numpy as np
    a = np.random.default_rng(0).standard_normal((t, k), dtype=np.float32)
    w = np.random.default_rng(1).standard_normal((n, k), dtype=np.float32)
    out = np.empty((t, n), dtype=np.float32)
    np.matmul(a, w.T, out=out)
    calls, start = 0, time.perf_counter()
    while calls == 0 or time.perf_counter() - start < seconds:
        np.matmul(a, w.T, out=out)
        calls += 1
    return 2 * t * k * n / ((time.perf_counter() - start) / calls) / 1e9


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default="target/release/falcon-batch")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shapes", default=DEFAULT_SHAPES)
    ap.add_argument("--out", default="results/bench-gemm.json")
    args = ap.parse_args()
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    shapes = [tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",")]
    best = {s: {"numpy": 0.0, "linear": 0.0, "linear_bf16": 0.0, "linear_f16": 0.0, "gemm_crate": 0.0} for s in shapes}
    loads = []
    for rep in range(args.repeats):
        la = os.getloadavg()[0]
        loads.append(la)
        for s in shapes:
            best[s]["numpy"] = max(best[s]["numpy"], numpy_gflops(*s))
        run = subprocess.run([args.bin, "bench", "--device", "cpu", "--gemm", args.shapes, "--reps", "1"],
                             check=True, capture_output=True, text=True)
        for row in json.loads(run.stdout):
            s = (row["t"], row["k"], row["n"])
            for key in ("linear", "linear_bf16", "linear_f16"):
                best[s][key] = max(best[s][key], row[key + "_gflops"])
            best[s]["gemm_crate"] = max(best[s]["gemm_crate"], row["gemm_crate_gflops"])
        print(f"[repeat {rep + 1}/{args.repeats}] load avg {la:.2f}", file=sys.stderr)
    print(f"GEMM GFLOP/s, {args.threads} threads, best of {args.repeats} interleaved repeats, "
          f"load avg (1 min) {min(loads):.2f}-{max(loads):.2f}\n")
    print("| T x K x N | falcon-batch linear | bf16 weights | f16 weights | gemm crate | numpy sgemm | linear / numpy | f16 / f32 weights |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for s in shapes:
        b = best[s]
        print(f"| {s[0]}x{s[1]}x{s[2]} | {b['linear']:.1f} | {b['linear_bf16']:.1f} | {b['linear_f16']:.1f} | "
              f"{b['gemm_crate']:.1f} | {b['numpy']:.1f} | {b['linear'] / b['numpy']:.2f} | {b['linear_f16'] / b['linear']:.2f} |")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"threads": args.threads, "loadavg": loads,
                   "shapes": [{"t": s[0], "k": s[1], "n": s[2], **best[s]} for s in shapes]}, f, indent=1)


if __name__ == "__main__":
    main()
