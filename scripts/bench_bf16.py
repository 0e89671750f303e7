#!/usr/bin/env python3
"""CPU benchmark of the bf16 compute route (issue 29): falcon-batch on bf16 weights against
llama.cpp on a BF16 GGUF of the same values, same machine, same documents, one run.

    python3 scripts/bench_bf16.py --bin target/release/falcon-batch --torch-python /path/to/python

(a) scoring: falcon-batch `score --compute-dtype bf16` on the bf16 model dir (convert --dtype bf16
    of the Q4_1 GGUF), beside the same weights on the f32 route (bf16 widened to f32 products)
    and the f32 model dir on the f32 route (the reference: best-choice agreement and the largest
    |delta| of a choice log-prob against it), vs llama.cpp's own multiple-choice batching
    (bench_cpu.py's `llama_mc_score`) on a BF16 GGUF made with llama.cpp's own quantizer
    (`llama_model_quantize`, LLAMA_FTYPE_MOSTLY_BF16) from the F32 GGUF of the same values. Each
    falcon-batch run's peak resident memory is read with `/usr/bin/time -f %M`.
(a2) the bf16 GEMM ceiling: torch.matmul in bf16 (oneDNN) on --threads threads at one decoder
    layer's GEMM shapes on 2048 rows and at 2048³, best GFLOP/s kept (scripts/bench_bf16_ceiling.py,
    in the Python given by --torch-python; '' skips it); falcon-batch's decoder-GEMM FLOP rate
    (2·rows·decoder linear weights / wall seconds) as a fraction of it.
(b) decode: seconds per new token at ~100 and ~2048 tokens of context, falcon-batch bf16 weights
    on the bf16 route with its bf16 cache and with the f16 cache (llama.cpp's default, the same
    bytes), and on the f32 route with the f16 cache, vs llama.cpp on the BF16 GGUF.
Every timing is repeated --repeats times, interleaved across engines, the minimum kept, the load
average recorded before each run; each repeat's own ratios (falcon-batch over llama.cpp, the
engines run in turn) are printed too, with their median. Writes --out (JSON) and prints a
markdown table.
"""

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_cpu as bc  # noqa: E402  (the shared runners: one implementation of each)


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", default="target/release/falcon-batch")
    ap.add_argument("--gguf", default="models/SmolLM2-135M-Instruct.Q4_1.gguf", help="what the model dirs are converted from")
    ap.add_argument("--model", default="models/smollm2-135m", help="f32 model dir (the reference route)")
    ap.add_argument("--bf16-model", default="models/smollm2-135m-bf16", help="bf16 model dir (made here if missing)")
    ap.add_argument("--f32-gguf", default="models/SmolLM2-135M-Instruct.F32.gguf", help="made here if missing")
    ap.add_argument("--bf16-gguf", default="models/SmolLM2-135M-Instruct.BF16.gguf", help="made here by llama_model_quantize if missing")
    ap.add_argument("--torch-python", default="", help="a Python with torch for the bf16 ceiling ('' skips it)")
    ap.add_argument("--docs", default="inputs/sample.jsonl")
    ap.add_argument("--copies", type=int, default=4, help="the corpus repeated this many times (ids made unique)")
    ap.add_argument("--target-delimiter", default=" ")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--mc-batch", type=int, default=2048)
    ap.add_argument("--mc-ubatch", type=int, default=512)
    ap.add_argument("--n-ctx", type=int, default=2048)
    ap.add_argument("--contexts", default="100,2048")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--out", default="results/bench-bf16.json")
    return ap.parse_args()


def make_bf16_gguf(src_f32, dst, threads):
    """llama.cpp's own quantizer, as `llama-quantize src dst BF16` runs it."""
    import llama_cpp as L
    params = L.llama_model_quantize_default_params()
    params.ftype = L.LLAMA_FTYPE_MOSTLY_BF16
    params.nthread = threads
    rc = L.llama_model_quantize(src_f32.encode(), (dst + ".part").encode(), ctypes.byref(params))
    if rc != 0:
        sys.exit(f"llama_model_quantize {src_f32} -> {dst} failed ({rc})")
    os.replace(dst + ".part", dst)


def bf16_ceiling(args, cfg, workdir):
    if not args.torch_python:
        return None
    out = os.path.join(workdir, "ceiling.json")
    here = os.path.dirname(os.path.abspath(__file__))
    shapes = ",".join(f"{k}x{n}" for k, n in bc.decoder_gemm_shapes(cfg))
    cmd = [args.torch_python, os.path.join(here, "bench_bf16_ceiling.py"), "--threads", str(args.threads),
           "--shapes", shapes, "--rows", "2048", "--out", out]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        print(f"warning: bf16 ceiling failed (rc={p.returncode}), skipped:\n{p.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.load(open(out))


def main():
    args = parse_args()
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    from tokenizers import Tokenizer
    import llama_cpp
    for pth in (args.bin, args.model, args.gguf, args.docs):
        if not os.path.exists(pth):
            sys.exit(f"missing: {pth}")
    load_start = os.getloadavg()
    workdir = tempfile.mkdtemp(prefix="bench-bf16-")
    if not os.path.exists(args.f32_gguf):
        print(f"making {args.f32_gguf} (dequantized {args.gguf})", file=sys.stderr)
        bc.make_f32_gguf(args.gguf, args.f32_gguf)
    if not os.path.exists(args.bf16_gguf):
        print(f"making {args.bf16_gguf} (llama_model_quantize BF16 of {args.f32_gguf})", file=sys.stderr)
        make_bf16_gguf(args.f32_gguf, args.bf16_gguf, args.threads)
    if not os.path.exists(os.path.join(args.bf16_model, "manifest.json")):
        print(f"making {args.bf16_model} (falcon-batch convert --dtype bf16 of {args.gguf})", file=sys.stderr)
        subprocess.run([args.bin, "convert", "--from", args.gguf, "--to", args.bf16_model, "--dtype", "bf16"],
                       check=True, stdout=subprocess.DEVNULL)

    tok = Tokenizer.from_file(os.path.join(args.model, "tokenizer.json"))
    source, docs = args.docs, bc.load_docs(args.docs)
    if args.copies > 1:
        docs = [dict(d, id=f"{d['id']}#{c}" if c else d["id"]) for c in range(args.copies) for d in docs]
        args.docs = os.path.join(workdir, "corpus.jsonl")
        with open(args.docs, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(d) + "\n" for d in docs)
    tdocs = bc.tokenize_docs(tok, docs, args.target_delimiter)
    n_docs, n_rows = len(tdocs), sum(bc.rows_run(t) for t in tdocs)
    with open(os.path.join(args.model, "manifest.json")) as f:
        cfg = json.load(f)["config"]

    # ---- (a) scoring, interleaved, min of repeats
    fb_variants = {
        "bf16 weights, bf16 compute": (args.bf16_model, ["--compute-dtype", "bf16"]),
        "bf16 weights, f32 compute": (args.bf16_model, ["--compute-dtype", "f32"]),
        "f32 weights, f32 compute": (args.model, ["--compute-dtype", "f32"]),
    }
    fb_runs, fb_lps, mc_runs, mc_lp, ceilings = {v: [] for v in fb_variants}, {}, [], None, []
    for rep in range(args.repeats):
        for v, (model, extra) in fb_variants.items():
            bc.warm(model)
            la, peak = os.getloadavg(), {}
            wall, own, lp, cmd = bc.fb_score(args, workdir, model, extra, peak)
            fb_runs[v].append({"wall_s": wall, "own": own, "loadavg": la, "max_rss_kib": peak.get("max_rss_kib"), "command": cmd})
            fb_lps[v] = lp
            print(f"[score {rep + 1}/{args.repeats}] falcon-batch {v} {wall:.2f} s, peak {peak.get('max_rss_kib')} KiB "
                  f"(load avg {la[0]:.2f})", file=sys.stderr)
        bc.warm(args.bf16_gguf)
        la = os.getloadavg()
        t, mc_lp = bc.llama_mc_score(args.bf16_gguf, args, tdocs)
        t["loadavg"] = la
        mc_runs.append(t)
        print(f"[score {rep + 1}/{args.repeats}] llama.cpp multiple-choice BF16 {t['total_s']:.2f} s (load avg {la[0]:.2f})", file=sys.stderr)
        la = os.getloadavg()
        c = bf16_ceiling(args, cfg, workdir)
        if c:
            c["loadavg"] = la
            ceilings.append(c)
            print(f"[score {rep + 1}/{args.repeats}] torch bf16 ceiling {c['best_gflops']:.1f} GFLOP/s, job shapes "
                  f"{c['job_shapes_gflops']:.1f} (load avg {la[0]:.2f})", file=sys.stderr)

    ref = fb_lps["f32 weights, f32 compute"]
    ids = [t["id"] for t in tdocs]

    def agreement(lpa, lpb):
        agree, maxd = 0, 0.0
        for i in ids:
            a, b = [x for _, _, x in lpa[i]], [x for _, _, x in lpb[i]]
            agree += int(max(range(len(a)), key=a.__getitem__) == max(range(len(b)), key=b.__getitem__))
            maxd = max(maxd, max(abs(x - y) for x, y in zip(a, b)))
        return agree, maxd

    mc = min(mc_runs, key=lambda r: r["total_s"])
    scoring = {}
    for v, runs in fb_runs.items():
        best = min(runs, key=lambda r: r["wall_s"])
        agree, maxd = agreement(ref, fb_lps[v])
        scoring[f"falcon-batch {v}"] = {
            "wall_s": best["wall_s"], "rows_per_s": n_rows / best["wall_s"], "loadavg": best["loadavg"],
            "max_rss_kib": best["max_rss_kib"], "runs_wall_s": [r["wall_s"] for r in runs], "command": best["command"],
            "own_summary": best["own"]["line"], "best_choice_agreement_vs_f32": agree, "max_abs_delta_logprob_vs_f32": maxd,
            "ratio_over_llama_mc_bf16_rows_per_s": mc["total_s"] / best["wall_s"],
            # Each repeat runs every engine in turn: its own ratio moves less with the machine's
            # drift than the best over the best does with one engine's lucky run.
            "ratio_pairs_over_llama_mc_bf16": [m["total_s"] / r["wall_s"] for r, m in zip(runs, mc_runs)],
        }
    agree, maxd = agreement(ref, mc_lp)
    scoring["llama.cpp multiple-choice BF16"] = {
        "wall_s": mc["total_s"], "load_s": mc["load_s"], "score_s": mc["score_s"], "rows_per_s": n_rows / mc["total_s"],
        "loadavg": mc["loadavg"], "runs_total_s": [r["total_s"] for r in mc_runs],
        "best_choice_agreement_vs_f32": agree, "max_abs_delta_logprob_vs_f32": maxd,
    }
    bf = scoring["falcon-batch bf16 weights, bf16 compute"]
    gemm_flops = 2.0 * n_rows * cfg["n_layers"] * bc.decoder_gemm_weights(cfg)
    # What falcon-batch multiplies: its last layer's MLP runs only for the rows the head reads
    # (each document's last prompt row and its choices' rows but the last), not for every row
    # as HF (and `gemm_flops`) counts.
    head_rows = sum(1 + sum(len(c) - 1 for c in t["choices"]) for t in tdocs)
    mlp_weights = sum(k * n for k, n in bc.decoder_gemm_shapes(cfg)[2:])
    executed = gemm_flops - 2.0 * (n_rows - head_rows) * mlp_weights
    flop_rate = {"decoder_gemm_flops": gemm_flops, "falcon_batch_bf16_gflops_wall": gemm_flops / bf["wall_s"] / 1e9,
                 "decoder_gemm_flops_executed": executed, "falcon_batch_bf16_gflops_wall_executed": executed / bf["wall_s"] / 1e9}
    if ceilings:
        c = max(ceilings, key=lambda r: r["best_gflops"])
        flop_rate.update({"torch_bf16_ceiling_gflops": c["best_gflops"], "torch_bf16_job_shapes_gflops": c["job_shapes_gflops"],
                          "torch_bf16_shapes_gflops": c["shapes_gflops"], "torch_version": c["torch"], "ceiling_loadavg": c["loadavg"],
                          "fraction_of_ceiling_wall": flop_rate["falcon_batch_bf16_gflops_wall"] / c["best_gflops"],
                          "fraction_of_ceiling_wall_executed": flop_rate["falcon_batch_bf16_gflops_wall_executed"] / c["best_gflops"],
                          "fraction_of_job_shapes_wall": flop_rate["falcon_batch_bf16_gflops_wall"] / c["job_shapes_gflops"]})
    f32_peak = scoring["falcon-batch f32 weights, f32 compute"]["max_rss_kib"]
    memory = {"bf16_over_f32_peak_rss": bf["max_rss_kib"] / f32_peak if bf["max_rss_kib"] and f32_peak else None}

    # ---- (b) decode
    decode = {}
    if not args.skip_decode:
        steps = args.new_tokens
        llm = bc.llama_load(args.bf16_gguf, args)
        # The bf16 route's own cache (bf16: what it reads of an f32 one, in llama.cpp's f16
        # cache's bytes) first, then the f16 cache on both routes.
        variants = {"falcon-batch bf16 weights, bf16 compute, bf16 cache": ("bf16", ["--compute-dtype", "bf16"]),
                    "falcon-batch bf16 weights, bf16 compute, f16 cache": ("f16", ["--compute-dtype", "bf16"]),
                    "falcon-batch bf16 weights, f32 compute, f16 cache": ("f16", ["--compute-dtype", "f32"])}
        for ctx in [int(x) for x in args.contexts.split(",")]:
            text, plen = bc.prompt_of_length(tok, docs, min(ctx, args.n_ctx - steps - 1))
            p_ids = tok.encode(text).ids
            runs, ll = {v: [] for v in variants}, []
            for _ in range(args.repeats):
                for v, (kv, extra) in variants.items():
                    runs[v].append(bc.fb_decode_time(args, text, steps, kv, args.bf16_model, extra)[0])
                bc.warm(args.bf16_gguf)
                ll.append(bc.llama_decode(llm, p_ids, steps))
            entry = {"prompt_tokens": plen, "llama.cpp BF16": {"s_per_token": min(ll), "runs": ll}}
            for v, rs in runs.items():
                entry[v] = {"s_per_token": min(rs), "runs": rs, "ratio_over_llama_bf16": min(rs) / min(ll),
                            "ratio_pairs": [a / b for a, b in zip(rs, ll)]}
            decode[str(ctx)] = entry
            print(f"[decode ctx {plen}] " + "; ".join(f"{v} {entry[v]['s_per_token'] * 1000:.2f} ms" for v in variants)
                  + f"; llama.cpp BF16 {min(ll) * 1000:.2f} ms", file=sys.stderr)
        del llm

    cpu = next((l.split(":", 1)[1].strip() for l in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
                if l.startswith("Model name")), "")
    flags = open("/proc/cpuinfo").read()
    result = {
        "machine": {"cpu": cpu, "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags, "cores": os.cpu_count(),
                    "threads_used": args.threads, "loadavg_at_start": load_start, "loadavg_at_end": os.getloadavg()},
        "versions": {"llama_cpp_python": llama_cpp.__version__},
        "corpus": {"path": source, "copies": args.copies, "docs": n_docs, "rows_run": n_rows},
        "repeats": args.repeats, "scoring": scoring, "flop_rate": flop_rate, "memory": memory, "decode": decode,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(markdown(result))
    print(f"\nwritten {args.out}", file=sys.stderr)


def markdown(res):
    s, c, m = res["scoring"], res["corpus"], res["machine"]
    la = lambda e: f" (load {e['loadavg'][0]:.2f})"
    lines = [f"bf16 scoring, {c['docs']} documents ({c['path']} x {c['copies']}; {c['rows_run']} rows), {m['threads_used']} threads, "
             f"{m['cpu']} (AVX512-BF16: {m['avx512_bf16']}), min of {res['repeats']} runs:", "",
             "| engine | wall s | rows/s | / llama.cpp MC BF16 | peak RSS MiB | best choice = f32 route | max abs Δ log-prob vs f32 |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for k, e in s.items():
        ratio = f"{e['ratio_over_llama_mc_bf16_rows_per_s']:.2f}" if "ratio_over_llama_mc_bf16_rows_per_s" in e else "1"
        rss = f"{e['max_rss_kib'] / 1024:.0f}" if e.get("max_rss_kib") else ""
        lines.append(f"| {k} | {e['wall_s']:.2f}{la(e)} | {e['rows_per_s']:.0f} | {ratio} | {rss} | "
                     f"{e['best_choice_agreement_vs_f32']}/{c['docs']} | {e['max_abs_delta_logprob_vs_f32']:.3f} |")
    bf = s["falcon-batch bf16 weights, bf16 compute"]
    if bf.get("ratio_pairs_over_llama_mc_bf16"):
        pairs = bf["ratio_pairs_over_llama_mc_bf16"]
        lines += ["", f"Pair by pair (each repeat runs the engines in turn), bf16 route rows/s over llama.cpp MC BF16's: "
                      f"{', '.join(f'{x:.2f}' for x in pairs)} (median {statistics.median(pairs):.2f})"]
    fr = res["flop_rate"]
    line = f"Decoder-GEMM FLOP rate of the bf16 route over its wall time: {fr['falcon_batch_bf16_gflops_wall']:.1f} GFLOP/s"
    if "torch_bf16_ceiling_gflops" in fr:
        line += (f"; torch {fr['torch_version']} bf16 matmul ceiling {fr['torch_bf16_ceiling_gflops']:.1f} GFLOP/s (best of the job's "
                 f"shapes on 2048 rows {fr['torch_bf16_job_shapes_gflops']:.1f}; load {fr['ceiling_loadavg'][0]:.2f}): "
                 f"{fr['fraction_of_ceiling_wall']:.2f} of the ceiling, {fr['fraction_of_job_shapes_wall']:.2f} of the job shapes' rate; "
                 f"counting only the products it runs (the last layer's MLP for the head's rows alone) "
                 f"{fr['falcon_batch_bf16_gflops_wall_executed']:.1f} GFLOP/s, {fr['fraction_of_ceiling_wall_executed']:.2f} of the ceiling")
    lines += ["", line]
    if res["memory"]["bf16_over_f32_peak_rss"]:
        lines.append(f"Peak RSS, bf16 weights + bf16 compute over f32 weights + f32 compute: {res['memory']['bf16_over_f32_peak_rss']:.2f}")
    if res["decode"]:
        vs = [k for k in next(iter(res["decode"].values())) if k.startswith("falcon-batch")]
        lines += ["", "Decode (greedy, one sequence), seconds per new token:", "",
                  "| prompt tokens | llama.cpp BF16 | " + " | ".join(f"{v} (/ llama.cpp)" for v in vs) + " |",
                  "|---:|---:|" + "---:|" * len(vs)]
        for e in res["decode"].values():
            lines.append(f"| {e['prompt_tokens']} | {e['llama.cpp BF16']['s_per_token']:.4f} | "
                         + " | ".join(f"{e[v]['s_per_token']:.4f} ({e[v]['ratio_over_llama_bf16']:.2f})" for v in vs) + " |")
        pairs = [e for e in res["decode"].values() if all(e[v].get("ratio_pairs") for v in vs)]
        lines += [""] if pairs else []
        for e in pairs:
            lines.append(f"- {e['prompt_tokens']} tokens, pair by pair (median): " + "; ".join(
                f"{v} {', '.join(f'{x:.2f}' for x in e[v]['ratio_pairs'])} ({statistics.median(e[v]['ratio_pairs']):.2f})" for v in vs))
    lines.append("")
    lines.append(f"load average at start {tuple(round(x, 2) for x in m['loadavg_at_start'])}, at end {tuple(round(x, 2) for x in m['loadavg_at_end'])}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
