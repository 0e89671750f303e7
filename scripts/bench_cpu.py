#!/usr/bin/env python3
"""CPU benchmark: falcon-batch vs llama.cpp (llama-cpp-python) on the same machine, same documents.

    python3 scripts/bench_cpu.py --bin target/release/falcon-batch --model models/smollm2-135m \
        --gguf models/SmolLM2-135M-Instruct.Q4_1.gguf --docs inputs/sample.jsonl

(a) scoring: falcon-batch `score` (one forward pass per document over a token tree of all choices)
    vs llama.cpp (prompt evaluated once, then each choice evaluated from the prompt's KV cache,
    truncated back to the prompt between choices), on the GGUF file the model dir was converted
    from (Q4_1, llama.cpp's native format) and on an F32 GGUF made here from it by dequantizing
    every tensor (the very weights falcon-batch runs). Both sides are fed the same token ids
    (falcon-batch's split rule, computed with the `tokenizers` package from the model dir's
    tokenizer.json), so the log-probs are comparable: prints agreement on the best choice and
    the largest |delta| of a choice log-prob.
(b) decode: seconds per new token at ~100 and ~2048 tokens of context. falcon-batch:
    (time(generate --max-new-tokens 33) - time(--max-new-tokens 1)) / 32, min of --repeats runs,
    so loading and prefill cancel. llama.cpp: eval the prompt, then time 32 single-token evals
    with greedy (argmax) sampling.
(c) a markdown table on stdout and a JSON file (--out, default results/bench-cpu.json).

Needs llama_cpp, tokenizers and numpy: run it with a Python that has them, or pass --python PATH
to re-run this script under that interpreter (`make bench` makes .venv-bench unless BENCH_PYTHON
is set).
"""
import argparse
import csv
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time

TEMPLATE = "Document: {text}\nQuestion: {question}\nAnswer:"

# The choice split rule (DESIGN.md, "Choice scoring"), shared with the fixture scripts.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures"))
from lm_eval_split import choice_joint  # noqa: E402


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", default="target/release/falcon-batch")
    ap.add_argument("--model", default="models/smollm2-135m", help="falcon-batch model dir")
    ap.add_argument("--gguf", default="models/SmolLM2-135M-Instruct.Q4_1.gguf",
                    help="the GGUF the model dir was converted from")
    ap.add_argument("--f32-gguf", default="models/SmolLM2-135M-Instruct.F32.gguf",
                    help="F32 GGUF made from --gguf (dequantized) if missing; 'none' to skip")
    ap.add_argument("--docs", default="inputs/sample.jsonl")
    ap.add_argument("--target-delimiter", default=" ",
                    help='between prompt and choice where neither side has whitespace (as score\'s; "" for none)')
    ap.add_argument("--threads", type=int, default=2, help="threads for both (RAYON_NUM_THREADS / n_threads)")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each timing; the min is kept")
    ap.add_argument("--contexts", default="100,2048", help="decode context lengths (tokens)")
    ap.add_argument("--new-tokens", type=int, default=32, help="decode steps timed")
    ap.add_argument("--n-ctx", type=int, default=2048, help="llama.cpp context")
    ap.add_argument("--out", default="results/bench-cpu.json")
    ap.add_argument("--workdir", default=None, help="scratch for falcon-batch outputs (default: a temp dir)")
    ap.add_argument("--python", default=None, help="re-run this script under this Python (one with llama_cpp)")
    ap.add_argument("--skip-decode", action="store_true")
    return ap.parse_args()


def maybe_reexec(args):
    if not args.python:
        return
    if os.path.realpath(sys.executable) == os.path.realpath(args.python) or os.environ.get("BENCH_CPU_REEXEC"):
        return
    argv = []
    skip = False
    for a in sys.argv[1:]:
        if skip:
            skip = False
            continue
        if a == "--python":
            skip = True
            continue
        if a.startswith("--python="):
            continue
        argv.append(a)
    env = dict(os.environ, BENCH_CPU_REEXEC="1")
    os.execve(args.python, [args.python, os.path.abspath(__file__)] + argv, env)


# ---------------------------------------------------------------- corpus and token counts

def load_docs(path):
    docs = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                docs.append(json.loads(line))
    return docs


def render(doc):
    if "prompt" in doc:
        return doc["prompt"]
    return TEMPLATE.replace("{text}", doc["text"]).replace("{question}", doc["question"])


def tokenize_docs(tok, docs, delimiter):
    """falcon-batch's split rule (lm-eval): trailing whitespace of the prompt moves to the front of
    each choice; the delimiter goes in only where neither side of the joint has whitespace;
    prompt ids = encode(prompt); choice ids = encode(prompt + joint + choice)[len(prompt ids):]."""
    out = []
    for d in docs:
        prompt = render(d)
        stripped = prompt.rstrip()
        ws = prompt[len(stripped):]
        p_ids = tok.encode(stripped).ids
        choices = []
        for c in d["choices"]:
            full = tok.encode(stripped + choice_joint(ws, c, delimiter) + c).ids
            assert full[: len(p_ids)] == p_ids, f"{d['id']}: prompt ids are not a prefix"
            choices.append(full[len(p_ids):])
        out.append({"id": d["id"], "prompt": p_ids, "choices": choices})
    return out


def rows_run(td):
    """Rows a forward pass runs for one document: the prompt, then each choice but its last token."""
    return len(td["prompt"]) + sum(len(c) - 1 for c in td["choices"])


# ---------------------------------------------------------------- falcon-batch

def fb_env(threads):
    return dict(os.environ, RAYON_NUM_THREADS=str(threads))


def fb_score(args, workdir):
    out_h5 = os.path.join(workdir, "bench.h5")
    out_csv = os.path.join(workdir, "bench.csv")
    cmd = [args.bin, "score", "--model", args.model, "--docs", args.docs, "--out", out_h5,
           "--csv", out_csv, "--overwrite", "--target-delimiter", args.target_delimiter]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=fb_env(args.threads), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"falcon-batch score failed (rc={p.returncode}):\n{p.stderr[-4000:]}")
    summary = ""
    for line in p.stderr.splitlines():
        if " tokens/s" in line and " in " in line and "this run" in line:
            summary = line.strip()
    m = re.search(r"in ([0-9.]+) s, ([0-9.]+) tokens/s", summary)
    own = {"line": summary, "seconds": float(m.group(1)) if m else None,
           "tokens_per_s": float(m.group(2)) if m else None}
    lp = {}
    with open(out_csv, newline="") as f:
        for r in csv.DictReader(f):
            lp.setdefault(r["id"], []).append((int(r["choice"]), int(r["n_tokens"]), float(r["logprob"])))
    for k in lp:
        lp[k].sort()
    return wall, own, lp, " ".join(cmd)


def fb_generate_time(args, prompt_text, n):
    cmd = [args.bin, "generate", "--model", args.model, "--prompt", prompt_text,
           "--max-new-tokens", str(n), "--ignore-eos"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=fb_env(args.threads), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"falcon-batch generate failed (rc={p.returncode}):\n{p.stderr[-4000:]}")
    return dt


# ---------------------------------------------------------------- llama.cpp

def make_f32_gguf(src, dst):
    """Dequantize every tensor of `src` to F32 and write `dst` with the same metadata."""
    import numpy as np
    import gguf
    r = gguf.GGUFReader(src)
    arch = r.fields[gguf.Keys.General.ARCHITECTURE].contents()
    w = gguf.GGUFWriter(dst + ".part", arch=arch)
    for field in r.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        vt = field.types[0]
        sub = field.types[-1] if vt == gguf.GGUFValueType.ARRAY else None
        val = field.contents()
        if field.name == gguf.Keys.General.FILE_TYPE:
            val = int(gguf.LlamaFileType.ALL_F32)
        w.add_key_value(field.name, val, vt, sub_type=sub)
    for t in r.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        w.add_tensor(t.name, np.ascontiguousarray(data), raw_dtype=gguf.GGMLQuantizationType.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(dst + ".part", dst)


def log_softmax_rows(x):
    import numpy as np
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def llama_load(path, args):
    from llama_cpp import Llama
    return Llama(model_path=path, n_ctx=args.n_ctx, logits_all=True, n_threads=args.threads,
                 n_threads_batch=args.threads, verbose=False)


def llama_score(path, args, tdocs):
    """Prompt once, then each choice from the prompt's KV cache (llama-cpp-python's eval drops the
    KV cache past n_tokens, so setting n_tokens back to the prompt length reuses the prompt)."""
    t0 = time.perf_counter()
    llm = llama_load(path, args)
    t_loaded = time.perf_counter()
    lp = {}
    for td in tdocs:
        p = td["prompt"]
        P = len(p)
        llm.reset()
        llm.eval(p)
        res = []
        for i, c in enumerate(td["choices"]):
            llm.n_tokens = P
            if len(c) > 1:
                llm.eval(c[:-1])
            rows = log_softmax_rows(llm.scores[P - 1: P - 1 + len(c), :])
            res.append((i, len(c), float(sum(rows[j, tokid] for j, tokid in enumerate(c)))))
        lp[td["id"]] = res
    t1 = time.perf_counter()
    del llm
    return {"load_s": t_loaded - t0, "score_s": t1 - t_loaded, "total_s": t1 - t0}, lp


def llama_decode(llm, prompt_ids, steps):
    import numpy as np
    llm.reset()
    llm.eval(prompt_ids)
    t0 = time.perf_counter()
    for _ in range(steps):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        llm.eval([nxt])
    return (time.perf_counter() - t0) / steps


# ---------------------------------------------------------------- decode prompts

def prompt_of_length(tok, docs, n):
    """Text from the corpus that re-tokenizes to exactly n tokens (or the nearest below)."""
    base = "\n\n".join(d.get("text", d.get("prompt", "")) for d in docs)
    ids = tok.encode(base).ids
    while len(ids) < n + 64:
        base = base + "\n\n" + base
        ids = tok.encode(base).ids
    best = None
    for k in [n + d for i in range(16) for d in ((-i, i) if i else (0,))]:
        text = tok.decode(ids[:k])
        m = len(tok.encode(text).ids)
        if m == n:
            return text, m
        if m < n and (best is None or m > best[1]):
            best = (text, m)
    return best


# ---------------------------------------------------------------- main

def main():
    args = parse_args()
    maybe_reexec(args)
    try:
        import numpy as np  # noqa: F401
        from tokenizers import Tokenizer
        import llama_cpp
    except ImportError as e:
        sys.exit(f"bench_cpu.py needs numpy, tokenizers and llama_cpp ({e}); run it with a Python "
                 "that has them (--python PATH), e.g. `make bench` or BENCH_PYTHON=... make bench")

    for pth in (args.bin, args.model, args.gguf, args.docs):
        if not os.path.exists(pth):
            sys.exit(f"missing: {pth}")
    load_start = os.getloadavg()
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench-cpu-")
    os.makedirs(workdir, exist_ok=True)

    tok = Tokenizer.from_file(os.path.join(args.model, "tokenizer.json"))
    docs = load_docs(args.docs)
    tdocs = tokenize_docs(tok, docs, args.target_delimiter)
    n_docs = len(tdocs)
    n_rows = sum(rows_run(t) for t in tdocs)
    n_prompt = sum(len(t["prompt"]) for t in tdocs)
    n_choice_tok = sum(len(c) for t in tdocs for c in t["choices"])
    print(f"{n_docs} documents, {n_prompt} prompt tokens, {n_choice_tok} choice tokens, "
          f"{n_rows} rows run (prompt + sum(choice - 1))", file=sys.stderr)

    ggufs = [("Q4_1", args.gguf)]
    if args.f32_gguf and args.f32_gguf != "none":
        if not os.path.exists(args.f32_gguf):
            print(f"making {args.f32_gguf} (dequantized {args.gguf})", file=sys.stderr)
            os.makedirs(os.path.dirname(os.path.abspath(args.f32_gguf)), exist_ok=True)
            make_f32_gguf(args.gguf, args.f32_gguf)
        ggufs.append(("F32", args.f32_gguf))

    # ---- (a) scoring, runs interleaved, min of repeats
    fb_runs, ll_runs = [], {name: [] for name, _ in ggufs}
    fb_lp, ll_lp, fb_cmd = None, {}, None
    for rep in range(args.repeats):
        wall, own, lp, fb_cmd = fb_score(args, workdir)
        fb_runs.append({"wall_s": wall, "own": own})
        fb_lp = lp
        print(f"[score {rep + 1}/{args.repeats}] falcon-batch {wall:.2f} s ({own['line']})", file=sys.stderr)
        for name, path in ggufs:
            t, lp = llama_score(path, args, tdocs)
            ll_runs[name].append(t)
            ll_lp[name] = lp
            print(f"[score {rep + 1}/{args.repeats}] llama.cpp {name} load {t['load_s']:.2f} s + "
                  f"score {t['score_s']:.2f} s", file=sys.stderr)

    # token counts must match what falcon-batch scored
    for td in tdocs:
        got = [n for _, n, _ in fb_lp[td["id"]]]
        want = [len(c) for c in td["choices"]]
        if got != want:
            print(f"warning: {td['id']}: choice token counts {got} (falcon-batch) vs {want} (here)", file=sys.stderr)

    fb_best = min(fb_runs, key=lambda r: r["wall_s"])
    scoring = {
        "falcon-batch": {
            "wall_s": fb_best["wall_s"], "docs_per_s": n_docs / fb_best["wall_s"],
            "tokens_per_s": n_rows / fb_best["wall_s"], "own_summary": fb_best["own"]["line"],
            "own_seconds": fb_best["own"]["seconds"], "own_tokens_per_s": fb_best["own"]["tokens_per_s"],
            "runs_wall_s": [r["wall_s"] for r in fb_runs], "command": fb_cmd,
        }
    }
    for name, _ in ggufs:
        best = min(ll_runs[name], key=lambda r: r["total_s"])
        lpa, lpb = fb_lp, ll_lp[name]
        agree, maxd = 0, 0.0
        for td in tdocs:
            a = [x for _, _, x in lpa[td["id"]]]
            b = [x for _, _, x in lpb[td["id"]]]
            agree += int(max(range(len(a)), key=a.__getitem__) == max(range(len(b)), key=b.__getitem__))
            maxd = max(maxd, max(abs(x - y) for x, y in zip(a, b)))
        scoring[f"llama.cpp {name}"] = {
            "wall_s": best["total_s"], "load_s": best["load_s"], "score_s": best["score_s"],
            "docs_per_s": n_docs / best["total_s"], "tokens_per_s": n_rows / best["total_s"],
            "score_only_tokens_per_s": n_rows / best["score_s"],
            "runs_total_s": [r["total_s"] for r in ll_runs[name]],
            "best_choice_agreement": agree, "max_abs_delta_logprob": maxd,
            "ratio_fb_over_llama_docs_per_s": (n_docs / fb_best["wall_s"]) / (n_docs / best["total_s"]),
        }

    # ---- (b) decode
    decode = {}
    if not args.skip_decode:
        steps = args.new_tokens
        llms = {name: llama_load(path, args) for name, path in ggufs}
        for ctx in [int(x) for x in args.contexts.split(",")]:
            plen = min(ctx, args.n_ctx - steps - 1)
            text, plen = prompt_of_length(tok, docs, plen)
            p_ids = tok.encode(text).ids
            t1s, tNs = [], []
            for rep in range(args.repeats):
                t1s.append(fb_generate_time(args, text, 1))
                tNs.append(fb_generate_time(args, text, steps + 1))
            fb_s = (min(tNs) - min(t1s)) / steps
            entry = {"prompt_tokens": plen, "falcon-batch": {
                "s_per_token": fb_s, "t_1_s": t1s, f"t_{steps + 1}_s": tNs}}
            for name, llm in llms.items():
                ts = [llama_decode(llm, p_ids, steps) for _ in range(args.repeats)]
                entry[f"llama.cpp {name}"] = {"s_per_token": min(ts), "runs": ts,
                                              "ratio_fb_over_llama_s_per_token": fb_s / min(ts)}
            decode[str(ctx)] = entry
            print(f"[decode ctx {plen}] falcon-batch {fb_s * 1000:.1f} ms/token; " + "; ".join(
                f"llama.cpp {n} {entry['llama.cpp ' + n]['s_per_token'] * 1000:.1f} ms/token" for n in llms),
                file=sys.stderr)
        del llms

    # ---- (c) report
    cpu = ""
    try:
        cpu = next((l.split(":", 1)[1].strip() for l in subprocess.run(["lscpu"], capture_output=True, text=True)
                    .stdout.splitlines() if l.startswith("Model name")), "")
    except OSError:
        pass
    result = {
        "machine": {"cpu": cpu, "cores": os.cpu_count(), "threads_used": args.threads,
                    "loadavg_at_start": load_start, "loadavg_at_end": os.getloadavg(), "platform": platform.platform()},
        "versions": {"llama_cpp_python": llama_cpp.__version__},
        "corpus": {"path": args.docs, "docs": n_docs, "prompt_tokens": n_prompt,
                   "choice_tokens": n_choice_tok, "rows_run": n_rows},
        "model": {"dir": args.model, "ggufs": dict((n, p) for n, p in ggufs)},
        "llama_cpp_method": "prompt evaluated once; each choice (all but its last token) evaluated from the "
                            "prompt's KV cache, truncated back to the prompt between choices; logits_all=True",
        "repeats": args.repeats, "scoring": scoring, "decode": decode,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)

    print(markdown(result, ggufs))
    print(f"\nwritten {args.out}", file=sys.stderr)


def markdown(res, ggufs):
    s = res["scoring"]
    fb = s["falcon-batch"]
    c = res["corpus"]
    lines = [f"Scoring {c['docs']} documents ({c['rows_run']} rows: prompt + choice tokens but each "
             f"choice's last), {res['machine']['threads_used']} threads, min of {res['repeats']} runs:", "",
             "| engine | weights | wall s | docs/s | tokens/s | falcon-batch / it (docs/s) | best-choice agreement | max abs Δ log-prob |",
             "|---|---|---:|---:|---:|---:|---:|---:|",
             f"| falcon-batch score | f32 (dequantized Q4_1) | {fb['wall_s']:.2f} | {fb['docs_per_s']:.3f} | "
             f"{fb['tokens_per_s']:.0f} | 1 | | |"]
    for name, _ in ggufs:
        e = s[f"llama.cpp {name}"]
        lines.append(f"| llama.cpp (prompt once + per-choice evals) | {name} GGUF | {e['wall_s']:.2f} "
                     f"(load {e['load_s']:.2f}) | {e['docs_per_s']:.3f} | {e['tokens_per_s']:.0f} | "
                     f"{e['ratio_fb_over_llama_docs_per_s']:.2f} | {e['best_choice_agreement']}/{c['docs']} | "
                     f"{e['max_abs_delta_logprob']:.3f} |")
    lines.append("")
    lines.append(f"load average (1, 5, 15 min) at start {tuple(round(x, 2) for x in res['machine']['loadavg_at_start'])}, "
                 f"at end {tuple(round(x, 2) for x in res['machine']['loadavg_at_end'])}")
    lines.append(f"falcon-batch's own summary: `{fb['own_summary']}`")
    if res["decode"]:
        lines += ["", "Decode (greedy, one sequence), seconds per new token:", "",
                  "| context (prompt tokens) | falcon-batch s/token | " +
                  " | ".join(f"llama.cpp {n} s/token | falcon-batch / llama.cpp {n}" for n, _ in ggufs) + " |",
                  "|---:|---:|" + "---:|---:|" * len(ggufs)]
        for ctx, e in res["decode"].items():
            row = f"| {e['prompt_tokens']} | {e['falcon-batch']['s_per_token']:.4f} | "
            row += " | ".join(f"{e['llama.cpp ' + n]['s_per_token']:.4f} | "
                              f"{e['llama.cpp ' + n]['ratio_fb_over_llama_s_per_token']:.2f}" for n, _ in ggufs)
            lines.append(row + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
