#!/usr/bin/env python3
"""This machine's bf16 GEMM ceiling: torch.matmul in bfloat16 (oneDNN on the CPU) on --threads
threads, at one decoder layer's GEMM shapes on --rows rows (`--shapes KxN,...`) and at 2048³, best
GFLOP/s of each over --seconds of repeats. Writes JSON (--out). Run by bench_bf16.py in a Python
that has torch."""

import argparse
import json
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shapes", required=True, help="KxN,... (out = x (rows, K) · w (K, N))")
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--seconds", type=float, default=0.5)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    shapes = [(a.rows, *map(int, s.split("x"))) for s in a.shapes.split(",")] + [(2048, 2048, 2048)]
    res = {}
    for m, k, n in shapes:
        x = torch.randn(m, k).to(torch.bfloat16)
        w = torch.randn(k, n).to(torch.bfloat16)
        torch.matmul(x, w)
        best, spent = float("inf"), 0.0
        while spent < a.seconds:
            t = time.perf_counter()
            torch.matmul(x, w)
            dt = time.perf_counter() - t
            best, spent = min(best, dt), spent + dt
        res[f"{m}x{k}x{n}"] = 2 * m * k * n / best / 1e9
    job = [v for (m, k, n), v in zip(shapes[:-1], res.values())]
    # The job's shapes as one layer: its FLOPs over the sum of each shape's best time.
    flops = [2 * m * k * n for m, k, n in shapes[:-1]]
    layer = sum(flops) / sum(f / (g * 1e9) for f, g in zip(flops, job)) / 1e9
    json.dump({"torch": torch.__version__, "threads": a.threads, "shapes_gflops": res,
               "best_gflops": max(res.values()), "job_shapes_gflops": layer}, open(a.out, "w"), indent=2)


if __name__ == "__main__":
    main()
