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
(a2) llama.cpp's own multiple-choice method (its perplexity tool's --multiple-choice/--hellaswag
    way), through llama-cpp-python's low-level batch API: each document's prompt goes into the
    batch once, tagged with every choice's sequence id, each choice's tokens (but its last) under
    its own id, as many documents as fit one decode of --mc-batch tokens, kv_unified, logits only at
    the scored rows, llama_memory_clear between decodes. On the F32 GGUF and on a Q8_0 GGUF made
    here from it.
(a3) HF transformers on the CPU (torch, in the Python given by --hf-python), scoring the
    lm-eval way: each (prompt, choice) its own sequence, a document's pairs one batch
    (scripts/bench_hf_lmeval.py), on the first --hf-docs documents (it is slow).
(a4) this machine's sgemm ceiling: numpy (OpenBLAS) float32 matmul on --threads threads at the
    model's decoder GEMM shapes and a square one, best GFLOP/s kept; falcon-batch's decoder-GEMM
    FLOP rate (2·rows·decoder linear weights / seconds) as a fraction of it; and numpy sustained
    for 8 s at the job's own shapes (one decoder layer's GEMMs on a 2048-row micro-batch, over
    and over), beside it: the ceiling is a best burst, the job a sustained rate.
Every timing is repeated --repeats times, the repeats interleaved across engines, the minimum
kept, and the load average read before each run is recorded next to it. Before each run the
engine's weight files are read once into the page cache, the same for every engine: this VM
drops page-cache pages that go unread for a while (kdamond), and a run that found its weights
dropped read them from disk instead (2-3 s for falcon-batch's 621 MB, in its wall time).
(b) decode: seconds per new token at ~100 and ~2048 tokens of context. falcon-batch: the
    32 one-token steps after the prompt's prefill, as `generate` times them itself (its stderr
    summary), min of --repeats runs, with its f32 cache (the default) and with `--kv-cache f16`
    (as llama.cpp keeps its cache unless told otherwise). llama.cpp: eval the prompt, then time
    32 single-token evals with greedy (argmax) sampling.
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

# The choice split rule (docs/DESIGN.md, "Scoring semantics"), shared with the fixture scripts.
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
    ap.add_argument("--q8-gguf", default="models/SmolLM2-135M-Instruct.Q8_0.gguf",
                    help="Q8_0 GGUF made from --f32-gguf if missing; 'none' to skip")
    ap.add_argument("--f16-gguf", default="models/SmolLM2-135M-Instruct.F16.gguf",
                    help="F16 GGUF (matrices F16, vectors F32) made from --f32-gguf if missing; 'none' to skip")
    ap.add_argument("--f16-model", default="models/smollm2-135m-f16",
                    help="falcon-batch model dir with f16 weights (convert --dtype f16 of --gguf) made if missing; "
                         "compared with --f16-gguf")
    ap.add_argument("--mc-batch", type=int, default=2048, help="tokens per decode for llama.cpp's multiple-choice method")
    ap.add_argument("--mc-ubatch", type=int, default=512, help="llama.cpp n_ubatch for the multiple-choice method")
    ap.add_argument("--hf-python", default="", help="a Python with torch + transformers + gguf for the HF peer ('' skips it)")
    ap.add_argument("--hf-docs", type=int, default=8, help="documents the HF peer scores (it is slow)")
    ap.add_argument("--skip-per-choice", action="store_true", help="skip llama.cpp's per-choice route (a)")
    ap.add_argument("--docs", default="inputs/sample.jsonl")
    ap.add_argument("--copies", type=int, default=4,
                    help="score the corpus this many times over (ids made distinct), as one job: "
                         "26 x 4 = 104 documents, so the job's fixed start-up (~1 s) weighs as in "
                         "a longer job, not 12%% of it")
    ap.add_argument("--target-delimiter", default=" ",
                    help='between prompt and choice where neither side has whitespace (as score\'s; "" for none)')
    ap.add_argument("--threads", type=int, default=2, help="threads for both (RAYON_NUM_THREADS / n_threads)")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each timing; the min is kept")
    ap.add_argument("--contexts", default="100,2048", help="decode context lengths (tokens)")
    ap.add_argument("--new-tokens", type=int, default=64, help="decode steps timed (each run's mean; 32 were too few on a noisy VM)")
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

def warm(path):
    """Read `path` (a file, or every file under a directory) once, so that the run after finds it
    in the page cache: every engine alike, before each of its timed runs."""
    files = [path] if os.path.isfile(path) else [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
    for name in files:
        with open(name, "rb") as f:
            while f.read(16 << 20):
                pass


def fb_env(threads):
    return dict(os.environ, RAYON_NUM_THREADS=str(threads))


def fb_score(args, workdir, model, extra=(), peak=None):
    """`extra`: more score flags (--compute-dtype). `peak`: a dict that gets the run's peak
    resident memory (`/usr/bin/time -f %M`, KiB) under "max_rss_kib"."""
    out_h5 = os.path.join(workdir, "bench.h5")
    out_csv = os.path.join(workdir, "bench.csv")
    cmd = [args.bin, "score", "--model", model, "--docs", args.docs, "--out", out_h5,
           "--csv", out_csv, "--overwrite", "--target-delimiter", args.target_delimiter, *extra]
    timed = ["/usr/bin/time", "-f", "max_rss_kib %M"] if peak is not None else []
    t0 = time.perf_counter()
    p = subprocess.run(timed + cmd, env=fb_env(args.threads), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"falcon-batch score failed (rc={p.returncode}):\n{p.stderr[-4000:]}")
    if peak is not None:
        m = re.search(r"max_rss_kib (\d+)", p.stderr)
        peak["max_rss_kib"] = int(m.group(1)) if m else None
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
            if r.get("status", "ok") != "ok":
                continue  # a failed document's row has no choice
            lp.setdefault(r["id"], []).append((int(r["choice"]), int(r["n_tokens"]), float(r["logprob"])))
    for k in lp:
        lp[k].sort()
    return wall, own, lp, " ".join(cmd)


def fb_decode_time(args, prompt_text, steps, kv_cache, model, extra=()):
    """Seconds per decode step: `generate` times its own steps (its stderr summary: the
    prompt's prefill apart, then `steps` one-token steps), so the prefill's run-to-run noise
    (seconds at 2000 tokens) stays out of a figure of milliseconds. `extra`: more flags."""
    cmd = [args.bin, "generate", "--model", model, "--prompt", prompt_text,
           "--max-new-tokens", str(steps + 1), "--ignore-eos", "--kv-cache", kv_cache, *extra]
    p = subprocess.run(cmd, env=fb_env(args.threads), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if p.returncode != 0:
        sys.exit(f"falcon-batch generate failed (rc={p.returncode}):\n{p.stderr[-4000:]}")
    m = re.search(r"prefill (\d+) prompt tokens in ([0-9.]+) s; (\d+) decode steps in ([0-9.]+) s", p.stderr)
    if not m or int(m.group(3)) != steps:
        sys.exit(f"falcon-batch generate printed no step summary for {steps} steps:\n{p.stderr[-2000:]}")
    return float(m.group(4)) / steps, float(m.group(2))


# ---------------------------------------------------------------- llama.cpp

def rewrite_gguf(src, dst, file_type, tensor):
    """`dst`: `src`'s metadata with general.file_type set to `file_type`, and each tensor as
    `tensor(values as f32)` returns it: (data, GGML type)."""
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
            val = int(file_type)
        w.add_key_value(field.name, val, vt, sub_type=sub)
    for t in r.tensors:
        data, kind = tensor(gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32))
        w.add_tensor(t.name, data, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(dst + ".part", dst)


def make_f32_gguf(src, dst):
    """Every tensor of `src` dequantized to F32."""
    import numpy as np
    import gguf
    rewrite_gguf(src, dst, gguf.LlamaFileType.ALL_F32, lambda v: (np.ascontiguousarray(v), gguf.GGMLQuantizationType.F32))


def make_f16_gguf(src_f32, dst):
    """The matrices of `src_f32` rounded to F16 (numpy's astype: to nearest even, as falcon-batch
    convert --dtype f16 rounds), 1-D tensors kept F32: what llama.cpp's converter writes for
    --outtype f16."""
    import numpy as np
    import gguf

    def f16(v):
        if v.ndim == 2:
            return np.ascontiguousarray(v.astype(np.float16)), gguf.GGMLQuantizationType.F16
        return np.ascontiguousarray(v), gguf.GGMLQuantizationType.F32
    rewrite_gguf(src_f32, dst, gguf.LlamaFileType.MOSTLY_F16, f16)


def make_q8_gguf(src_f32, dst):
    """Every 2-D tensor whose rows are whole 32-value blocks quantized to Q8_0, as llama.cpp's
    quantize does for an all-Q8_0 file; norms and other 1-D tensors stay F32."""
    import numpy as np
    import gguf

    def q8(v):
        if v.ndim == 2 and v.shape[-1] % 32 == 0:
            return gguf.quants.quantize(v, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
        return np.ascontiguousarray(v), gguf.GGMLQuantizationType.F32
    rewrite_gguf(src_f32, dst, gguf.LlamaFileType.MOSTLY_Q8_0, q8)


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


def mc_pack(tdocs, n_batch, max_seq):
    """Documents in order, as many per decode as fit n_batch tokens and max_seq sequence ids."""
    groups, cur, toks, seqs = [], [], 0, 0
    for td in tdocs:
        n = rows_run(td)
        if n > n_batch:
            sys.exit(f"{td['id']}: {n} rows do not fit --mc-batch {n_batch}")
        k = len(td["choices"])
        if cur and (toks + n > n_batch or seqs + k > max_seq):
            groups.append(cur)
            cur, toks, seqs = [], 0, 0
        cur.append(td)
        toks += n
        seqs += k
    if cur:
        groups.append(cur)
    return groups


def llama_mc_score(path, args, tdocs):
    """llama.cpp's multiple-choice batching (perplexity.cpp --multiple-choice): prompt rows carry
    every choice's sequence id, choice rows their own; logits only where a choice token is scored."""
    import ctypes
    import numpy as np
    import llama_cpp as L
    t0 = time.perf_counter()
    L.llama_backend_init()
    mp = L.llama_model_default_params()
    model = L.llama_model_load_from_file(path.encode(), mp)
    if not model:
        sys.exit(f"llama.cpp could not load {path}")
    groups = mc_pack(tdocs, args.mc_batch, 256)  # 256: LLAMA_MAX_SEQ
    # As the perplexity tool does: as many sequences as the fullest decode needs, no more.
    max_seq = max(sum(len(td["choices"]) for td in g) for g in groups)
    cp = L.llama_context_default_params()
    cp.n_ctx = args.mc_batch
    cp.n_batch = args.mc_batch
    cp.n_ubatch = min(args.mc_ubatch, args.mc_batch)
    cp.n_seq_max = max_seq
    cp.n_threads = args.threads
    cp.n_threads_batch = args.threads
    cp.kv_unified = True
    ctx = L.llama_init_from_model(model, cp)
    if not ctx:
        sys.exit(f"llama.cpp could not make a context for {path}")
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    batch = L.llama_batch_init(args.mc_batch, 0, max_seq)
    mem = L.llama_get_memory(ctx)
    t_loaded = time.perf_counter()
    lp = {}
    for group in groups:
        n = 0
        seq0 = 0
        wanted = []  # per document: (first output row of each choice's tokens)
        out_row = 0

        def put(tok, pos, seq_ids, logits):
            nonlocal n
            batch.token[n] = tok
            batch.pos[n] = pos
            batch.n_seq_id[n] = len(seq_ids)
            for j, sid in enumerate(seq_ids):
                batch.seq_id[n][j] = sid
            batch.logits[n] = logits
            n += 1

        for td in group:
            p, chs = td["prompt"], td["choices"]
            ids = list(range(seq0, seq0 + len(chs)))
            for i, tok in enumerate(p):
                put(tok, i, ids, i == len(p) - 1)
            prompt_row = out_row
            out_row += 1
            firsts = []
            for ci, c in enumerate(chs):
                firsts.append(out_row)
                for j, tok in enumerate(c[:-1]):
                    put(tok, len(p) + j, [seq0 + ci], True)
                out_row += len(c) - 1
            wanted.append((td, prompt_row, firsts))
            seq0 += len(chs)
        batch.n_tokens = n
        if L.llama_decode(ctx, batch) != 0:
            sys.exit("llama_decode failed")
        logits = np.ctypeslib.as_array(L.llama_get_logits(ctx), shape=(out_row, n_vocab))
        for td, prompt_row, firsts in wanted:
            res = []
            for ci, c in enumerate(td["choices"]):
                rows = [prompt_row] + list(range(firsts[ci], firsts[ci] + len(c) - 1))
                ls = log_softmax_rows(logits[rows])
                res.append((ci, len(c), float(sum(ls[j, tokid] for j, tokid in enumerate(c)))))
            lp[td["id"]] = res
        L.llama_memory_clear(mem, True)
    t1 = time.perf_counter()
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    L.llama_model_free(model)
    return {"load_s": t_loaded - t0, "score_s": t1 - t_loaded, "total_s": t1 - t0}, lp


def hf_score(args, tdocs, workdir):
    ids_path = os.path.join(workdir, "hf-ids.json")
    out_path = os.path.join(workdir, "hf-out.json")
    with open(ids_path, "w") as f:
        json.dump(tdocs, f)
    here = os.path.dirname(os.path.abspath(__file__))
    cmd = [args.hf_python, os.path.join(here, "bench_hf_lmeval.py"), "--model", args.model, "--ids", ids_path,
           "--threads", str(args.threads), "--out", out_path]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        print(f"warning: HF peer failed (rc={p.returncode}), skipped:\n{p.stderr[-2000:]}", file=sys.stderr)
        return None, None
    r = json.load(open(out_path))
    lp = {k: [tuple(x) for x in v] for k, v in r["logprobs"].items()}
    return {"load_s": r["load_s"], "score_s": r["score_s"], "total_s": r["load_s"] + r["score_s"]}, lp


def decoder_gemm_shapes(cfg):
    """(K, N) of one decoder layer's linear maps, from the manifest config: qkv, attention out,
    up (Falcon) or gate+up (Llama, Qwen2), down."""
    c, h, kv, d = cfg["hidden_size"], cfg["n_heads"], cfg["n_kv_heads"], cfg["head_dim"]
    falcon = cfg["family"] == "falcon"
    i = (cfg.get("intermediate_size") or 4 * c) if falcon else cfg["intermediate_size"]
    return [(c, (h + 2 * kv) * d), (h * d, c), (c, i if falcon else 2 * i), (i, c)]


def decoder_gemm_weights(cfg):
    """Weights of one decoder layer's linear maps (what its GEMMs multiply by)."""
    return sum(k * n for k, n in decoder_gemm_shapes(cfg))


def sgemm_ceiling(cfg, threads, seconds=0.4):
    """numpy float32 matmul GFLOP/s at the decoder's shapes (M = 512 rows) and at 1536³; best kept."""
    import numpy as np
    c, i = cfg["hidden_size"], cfg.get("intermediate_size") or 4 * cfg["hidden_size"]
    qkv = (cfg["n_heads"] + 2 * cfg["n_kv_heads"]) * cfg["head_dim"]
    shapes = [(512, c, qkv), (512, c, 2 * i), (512, i, c), (2048, c, 2 * i), (1536, 1536, 1536)]
    res = {}
    for m, k, n in shapes:
        a = np.random.default_rng(0).standard_normal((m, k), dtype=np.float32)
        b = np.random.default_rng(1).standard_normal((k, n), dtype=np.float32)
        out = np.empty((m, n), dtype=np.float32)
        np.matmul(a, b, out=out)
        best, spent = float("inf"), 0.0
        while spent < seconds:
            t = time.perf_counter()
            np.matmul(a, b, out=out)
            dt = time.perf_counter() - t
            best, spent = min(best, dt), spent + dt
        res[f"{m}x{k}x{n}"] = 2 * m * k * n / best / 1e9
    return max(res.values()), res


def sgemm_sustained(cfg, seconds=8.0, rows=2048):
    """numpy float32 matmul GFLOP/s doing what the job's GEMMs do for `seconds`: one decoder
    layer's four products (qkv, attention out, gate+up or up, down) on `rows` rows (a full
    micro-batch), over and over. A rate sustained like the job's, where the ceiling is a best
    burst: on a VM whose core shares its SMT sibling with other tenants the two differ by more
    than the kernels do."""
    import numpy as np
    shapes = decoder_gemm_shapes(cfg)
    rng = np.random.default_rng(0)
    ops = [(rng.standard_normal((rows, k), dtype=np.float32), rng.standard_normal((k, n), dtype=np.float32),
            np.empty((rows, n), dtype=np.float32)) for k, n in shapes]
    flops_per_layer = sum(2 * rows * k * n for k, n in shapes)
    for a, b, out in ops:
        np.matmul(a, b, out=out)
    layers, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for a, b, out in ops:
            np.matmul(a, b, out=out)
        layers += 1
    return layers * flops_per_layer / (time.perf_counter() - t0) / 1e9


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
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
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
    source = args.docs
    docs = load_docs(args.docs)
    if args.copies > 1:
        docs = [dict(d, id=f"{d['id']}#{c}" if c else d["id"]) for c in range(args.copies) for d in docs]
        args.docs = os.path.join(workdir, "corpus.jsonl")
        with open(args.docs, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(d) + "\n" for d in docs)
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
    mc_ggufs = [(n, p) for n, p in ggufs if n == "F32"]
    fb_models = {"f32": args.model}
    if mc_ggufs and args.f16_gguf != "none":
        if not os.path.exists(args.f16_gguf):
            print(f"making {args.f16_gguf} (F16 of {args.f32_gguf})", file=sys.stderr)
            make_f16_gguf(args.f32_gguf, args.f16_gguf)
        if not os.path.exists(os.path.join(args.f16_model, "manifest.json")):
            print(f"making {args.f16_model} (falcon-batch convert --dtype f16 of {args.gguf})", file=sys.stderr)
            subprocess.run([args.bin, "convert", "--from", args.gguf, "--to", args.f16_model, "--dtype", "f16"],
                           check=True, stdout=subprocess.DEVNULL)
        mc_ggufs.append(("F16", args.f16_gguf))
        ggufs.append(("F16", args.f16_gguf))
        fb_models["f16"] = args.f16_model
    if mc_ggufs and args.q8_gguf and args.q8_gguf != "none":
        if not os.path.exists(args.q8_gguf):
            print(f"making {args.q8_gguf} (Q8_0 of {args.f32_gguf})", file=sys.stderr)
            make_q8_gguf(args.f32_gguf, args.q8_gguf)
        mc_ggufs.append(("Q8_0", args.q8_gguf))
    decode_ggufs = ggufs  # decode compares with every GGUF; --skip-per-choice drops route (a) only
    if args.skip_per_choice:
        ggufs = []
    with open(os.path.join(args.model, "manifest.json")) as f:
        cfg = json.load(f)["config"]
    hf_docs = tdocs[: args.hf_docs] if args.hf_python else []

    # ---- (a) scoring, runs interleaved, min of repeats
    fb_runs, ll_runs = {w: [] for w in fb_models}, {name: [] for name, _ in ggufs}
    mc_runs, mc_lp = {name: [] for name, _ in mc_ggufs}, {}
    hf_runs, hf_lp, sgemm_runs = [], None, []
    fb_lps, ll_lp, fb_cmds = {}, {}, {}
    for rep in range(args.repeats):
        for weights, model in fb_models.items():
            warm(model)
            la = os.getloadavg()
            wall, own, lp, fb_cmds[weights] = fb_score(args, workdir, model)
            fb_runs[weights].append({"wall_s": wall, "own": own, "loadavg": la})
            fb_lps[weights] = lp
            print(f"[score {rep + 1}/{args.repeats}] falcon-batch {weights} weights {wall:.2f} s ({own['line']})", file=sys.stderr)
        for name, path in mc_ggufs:
            warm(path)
            la = os.getloadavg()
            t, lp = llama_mc_score(path, args, tdocs)
            t["loadavg"] = la
            mc_runs[name].append(t)
            mc_lp[name] = lp
            print(f"[score {rep + 1}/{args.repeats}] llama.cpp multiple-choice {name} load {t['load_s']:.2f} s + "
                  f"score {t['score_s']:.2f} s (load avg {la[0]:.2f})", file=sys.stderr)
        if hf_docs:
            warm(args.model)
            la = os.getloadavg()
            t, lp = hf_score(args, hf_docs, workdir)
            if t is None:
                hf_docs = []
            else:
                t["loadavg"] = la
                hf_runs.append(t)
                hf_lp = lp
                print(f"[score {rep + 1}/{args.repeats}] HF transformers ({len(hf_docs)} docs) load {t['load_s']:.2f} s + "
                      f"score {t['score_s']:.2f} s (load avg {la[0]:.2f})", file=sys.stderr)
        la = os.getloadavg()
        best, shapes = sgemm_ceiling(cfg, args.threads)
        sustained = sgemm_sustained(cfg)
        sgemm_runs.append({"gflops": best, "shapes": shapes, "loadavg": la, "sustained_gflops": sustained})
        print(f"[score {rep + 1}/{args.repeats}] numpy sgemm ceiling {best:.1f} GFLOP/s, sustained at the job's shapes "
              f"{sustained:.1f} (load avg {la[0]:.2f})", file=sys.stderr)
        for name, path in ggufs:
            warm(path)
            la = os.getloadavg()
            t, lp = llama_score(path, args, tdocs)
            t["loadavg"] = la
            ll_runs[name].append(t)
            ll_lp[name] = lp
            print(f"[score {rep + 1}/{args.repeats}] llama.cpp {name} load {t['load_s']:.2f} s + "
                  f"score {t['score_s']:.2f} s", file=sys.stderr)

    fb_lp = fb_lps["f32"]
    # token counts must match what falcon-batch scored
    for td in tdocs:
        got = [n for _, n, _ in fb_lp[td["id"]]]
        want = [len(c) for c in td["choices"]]
        if got != want:
            print(f"warning: {td['id']}: choice token counts {got} (falcon-batch) vs {want} (here)", file=sys.stderr)

    fb_bests = {w: min(runs, key=lambda r: r["wall_s"]) for w, runs in fb_runs.items()}
    fb_best = fb_bests["f32"]
    fb_dps = n_docs / fb_best["wall_s"]
    # A GGUF is compared with falcon-batch holding the same weights where it runs them.
    fb_for = lambda name: "f16" if name == "F16" and "f16" in fb_bests else "f32"
    gemm_flops = 2.0 * n_rows * cfg["n_layers"] * decoder_gemm_weights(cfg)
    ceiling = max(sgemm_runs, key=lambda r: r["gflops"])
    own_s = min((r["own"]["seconds"] for r in fb_runs["f32"] if r["own"]["seconds"]), default=None)
    flop_rate = {
        "decoder_gemm_flops": gemm_flops,
        "falcon_batch_gflops_wall": gemm_flops / fb_best["wall_s"] / 1e9,
        "falcon_batch_gflops_own": gemm_flops / own_s / 1e9 if own_s else None,
        "sgemm_ceiling_gflops": ceiling["gflops"], "sgemm_shapes_gflops": ceiling["shapes"],
        "sgemm_loadavg": ceiling["loadavg"], "sgemm_runs_gflops": [r["gflops"] for r in sgemm_runs],
        "sgemm_sustained_gflops": max(r["sustained_gflops"] for r in sgemm_runs),
        "sgemm_sustained_runs_gflops": [r["sustained_gflops"] for r in sgemm_runs],
    }
    flop_rate["fraction_of_sustained_wall"] = flop_rate["falcon_batch_gflops_wall"] / flop_rate["sgemm_sustained_gflops"]
    flop_rate["fraction_of_ceiling_wall"] = flop_rate["falcon_batch_gflops_wall"] / ceiling["gflops"]
    if own_s:
        flop_rate["fraction_of_ceiling_own"] = flop_rate["falcon_batch_gflops_own"] / ceiling["gflops"]

    def agreement(lpa, lpb, ids):
        agree, maxd = 0, 0.0
        for i in ids:
            a = [x for _, _, x in lpa[i]]
            b = [x for _, _, x in lpb[i]]
            agree += int(max(range(len(a)), key=a.__getitem__) == max(range(len(b)), key=b.__getitem__))
            maxd = max(maxd, max(abs(x - y) for x, y in zip(a, b)))
        return agree, maxd

    peers = {}
    for name, _ in mc_ggufs:
        best = min(mc_runs[name], key=lambda r: r["total_s"])
        fbw = fb_for(name)
        agree, maxd = agreement(fb_lps[fbw], mc_lp[name], [t["id"] for t in tdocs])
        peers[f"llama.cpp multiple-choice {name}"] = {
            "wall_s": best["total_s"], "load_s": best["load_s"], "score_s": best["score_s"],
            "docs": n_docs, "docs_per_s": n_docs / best["total_s"], "tokens_per_s": n_rows / best["total_s"],
            "runs_total_s": [r["total_s"] for r in mc_runs[name]], "loadavg": best["loadavg"],
            "best_choice_agreement": agree, "max_abs_delta_logprob": maxd, "falcon_batch_weights": fbw,
            "ratio_fb_over_it_docs_per_s": (n_docs / fb_bests[fbw]["wall_s"]) / (n_docs / best["total_s"]),
        }
    if hf_runs:
        best = min(hf_runs, key=lambda r: r["total_s"])
        nd = len(hf_docs)
        agree, maxd = agreement(fb_lp, hf_lp, [t["id"] for t in hf_docs])
        hf_rows = sum(rows_run(t) for t in hf_docs)
        peers["HF transformers (lm-eval way)"] = {
            "wall_s": best["total_s"], "load_s": best["load_s"], "score_s": best["score_s"],
            "docs": nd, "docs_per_s": nd / best["total_s"], "tokens_per_s": hf_rows / best["total_s"],
            "runs_total_s": [r["total_s"] for r in hf_runs], "loadavg": best["loadavg"],
            "best_choice_agreement": agree, "max_abs_delta_logprob": maxd,
            "ratio_fb_over_it_docs_per_s": fb_dps / (nd / best["total_s"]),
        }
    scoring = {}
    for w, b in fb_bests.items():
        scoring["falcon-batch" if w == "f32" else f"falcon-batch {w} weights"] = {
            "wall_s": b["wall_s"], "docs_per_s": n_docs / b["wall_s"],
            "tokens_per_s": n_rows / b["wall_s"], "own_summary": b["own"]["line"],
            "own_seconds": b["own"]["seconds"], "own_tokens_per_s": b["own"]["tokens_per_s"],
            "runs_wall_s": [r["wall_s"] for r in fb_runs[w]], "command": fb_cmds[w], "loadavg": b["loadavg"],
        }
    if "f16" in fb_lps:
        agree, maxd = agreement(fb_lp, fb_lps["f16"], [t["id"] for t in tdocs])
        scoring["falcon-batch f16 weights"].update({"best_choice_agreement": agree, "max_abs_delta_logprob": maxd,
                                                   "ratio_f16_over_f32_docs_per_s": fb_best["wall_s"] / fb_bests["f16"]["wall_s"]})
    scoring.update(peers)
    for name, _ in ggufs:
        best = min(ll_runs[name], key=lambda r: r["total_s"])
        fbw = fb_for(name)
        lpa, lpb = fb_lps[fbw], ll_lp[name]
        agree, maxd = agreement(lpa, lpb, [t["id"] for t in tdocs])
        scoring[f"llama.cpp {name}"] = {
            "wall_s": best["total_s"], "load_s": best["load_s"], "score_s": best["score_s"],
            "docs_per_s": n_docs / best["total_s"], "tokens_per_s": n_rows / best["total_s"],
            "score_only_tokens_per_s": n_rows / best["score_s"],
            "runs_total_s": [r["total_s"] for r in ll_runs[name]], "loadavg": best["loadavg"],
            "best_choice_agreement": agree, "max_abs_delta_logprob": maxd,
            "falcon_batch_weights": fbw,
            "ratio_fb_over_llama_docs_per_s": (n_docs / fb_bests[fbw]["wall_s"]) / (n_docs / best["total_s"]),
        }

    # ---- (b) decode
    decode = {}
    if not args.skip_decode:
        steps = args.new_tokens
        llms = {name: llama_load(path, args) for name, path in decode_ggufs}
        for ctx in [int(x) for x in args.contexts.split(",")]:
            plen = min(ctx, args.n_ctx - steps - 1)
            text, plen = prompt_of_length(tok, docs, plen)
            p_ids = tok.encode(text).ids
            # Repeats interleaved across every engine: a load spike then hits one repeat of
            # each alike, and the minimum of each is kept.
            # falcon-batch: f32 weights with either cache; f16 weights with the f16 cache, as
            # llama.cpp keeps its cache by default.
            variants = {"falcon-batch": ("f32", "f32"), "falcon-batch f16 cache": ("f32", "f16")}
            if "f16" in fb_models:
                variants["falcon-batch f16 weights, f16 cache"] = ("f16", "f16")
            runs = {v: [] for v in variants}
            ts = {name: [] for name in llms}
            for _ in range(args.repeats):
                for v, rs in runs.items():
                    weights, kv = variants[v]
                    rs.append(fb_decode_time(args, text, steps, kv, fb_models[weights]))
                for name, llm in llms.items():
                    # llama.cpp maps its GGUF: pages dropped since the last run would be read
                    # back from disk inside the timed steps.
                    warm(dict(decode_ggufs)[name])
                    ts[name].append(llama_decode(llm, p_ids, steps))
            entry = {"prompt_tokens": plen}
            for v, rs in runs.items():
                entry[v] = {"s_per_token": min(r[0] for r in rs), "s_per_token_runs": [r[0] for r in rs], "prefill_s": [r[1] for r in rs]}
            fb_s = entry["falcon-batch"]["s_per_token"]
            fb16_s = entry["falcon-batch f16 cache"]["s_per_token"]
            for name, t in ts.items():
                e = entry[f"llama.cpp {name}"] = {"s_per_token": min(t), "runs": t}
                if fb_for(name) == "f16":
                    # The same weights and cache dtypes: one ratio.
                    e["ratio_fb_over_llama_s_per_token"] = entry["falcon-batch f16 weights, f16 cache"]["s_per_token"] / min(t)
                else:
                    e["ratio_fb_over_llama_s_per_token"] = fb_s / min(t)
                    e["ratio_fb_f16_cache_over_llama_s_per_token"] = fb16_s / min(t)
            decode[str(ctx)] = entry
            print(f"[decode ctx {plen}] " + "; ".join(f"{v} {entry[v]['s_per_token'] * 1000:.1f} ms/token" for v in variants) + "; " + "; ".join(
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
        "corpus": {"path": source, "copies": args.copies, "docs": n_docs, "prompt_tokens": n_prompt,
                   "choice_tokens": n_choice_tok, "rows_run": n_rows},
        "model": {"dir": args.model, "ggufs": dict((n, p) for n, p in ggufs)},
        "llama_cpp_method": "prompt evaluated once; each choice (all but its last token) evaluated from the "
                            "prompt's KV cache, truncated back to the prompt between choices; logits_all=True",
        "llama_cpp_multiple_choice_method": f"llama-cpp-python low-level batch API: prompt rows tagged with every "
                                            f"choice's sequence id, choice rows (all but the last token) with their own, "
                                            f"documents packed into decodes of {args.mc_batch} tokens (n_ubatch "
                                            f"{min(args.mc_ubatch, args.mc_batch)}), kv_unified, logits only at scored rows, "
                                            "llama_memory_clear between decodes",
        "repeats": args.repeats, "scoring": scoring, "flop_rate": flop_rate, "decode": decode,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)

    print(markdown(result, ggufs, [n for n, _ in mc_ggufs], decode_ggufs))
    print(f"\nwritten {args.out}", file=sys.stderr)


def markdown(res, ggufs, mc_names=(), decode_ggufs=None):
    decode_ggufs = ggufs if decode_ggufs is None else decode_ggufs
    s = res["scoring"]
    fb = s["falcon-batch"]
    c = res["corpus"]
    lines = [f"Scoring {c['docs']} documents ({c['path']} x {c.get('copies', 1)}; {c['rows_run']} rows: prompt + choice tokens but each "
             f"choice's last), {res['machine']['threads_used']} threads, min of {res['repeats']} runs:", "",
             "| engine | weights | wall s | docs/s | tokens/s | falcon-batch / it (docs/s) | best-choice agreement | max abs Δ log-prob |",
             "|---|---|---:|---:|---:|---:|---:|---:|",
             f"| falcon-batch score | f32 (dequantized Q4_1) | {fb['wall_s']:.2f} | {fb['docs_per_s']:.3f} | "
             f"{fb['tokens_per_s']:.0f} | 1 | | |"]
    la = lambda e: f" (load avg {e['loadavg'][0]:.2f})" if e.get("loadavg") else ""
    lines[-1] = lines[-1].replace(f"| {fb['wall_s']:.2f} |", f"| {fb['wall_s']:.2f}{la(fb)} |", 1)
    f16 = s.get("falcon-batch f16 weights")
    if f16:
        lines.append(f"| falcon-batch score | f16 (convert --dtype f16) | {f16['wall_s']:.2f}{la(f16)} | {f16['docs_per_s']:.3f} | "
                     f"{f16['tokens_per_s']:.0f} | f16 / f32: {f16['ratio_f16_over_f32_docs_per_s']:.2f} | "
                     f"{f16['best_choice_agreement']}/{c['docs']} (vs f32) | {f16['max_abs_delta_logprob']:.3f} |")
    vs = lambda e: " (vs f16 weights)" if e.get("falcon_batch_weights") == "f16" else ""
    for key, label in [(f"llama.cpp multiple-choice {n}", (f"llama.cpp multiple-choice batching", f"{n} GGUF"))
                       for n in mc_names] + [("HF transformers (lm-eval way)", ("HF transformers, lm-eval way", "f32 (the model dir's)"))]:
        if key not in s:
            continue
        e = s[key]
        lines.append(f"| {label[0]} ({e['docs']} docs) | {label[1]} | {e['wall_s']:.2f}{la(e)} | {e['docs_per_s']:.3f} | "
                     f"{e['tokens_per_s']:.0f} | {e['ratio_fb_over_it_docs_per_s']:.2f}{vs(e)} | {e['best_choice_agreement']}/{e['docs']} | "
                     f"{e['max_abs_delta_logprob']:.3f} |")
    for name, _ in ggufs:
        e = s[f"llama.cpp {name}"]
        lines.append(f"| llama.cpp (prompt once + per-choice evals) | {name} GGUF | {e['wall_s']:.2f} "
                     f"(load {e['load_s']:.2f}) | {e['docs_per_s']:.3f} | {e['tokens_per_s']:.0f} | "
                     f"{e['ratio_fb_over_llama_docs_per_s']:.2f}{vs(e)} | {e['best_choice_agreement']}/{c['docs']} | "
                     f"{e['max_abs_delta_logprob']:.3f} |")
    fr = res.get("flop_rate")
    if fr:
        lines += ["", f"Decoder-GEMM FLOP rate: falcon-batch {fr['falcon_batch_gflops_wall']:.1f} GFLOP/s over its wall time "
                  f"({fr['fraction_of_ceiling_wall']:.2f} of the sgemm ceiling)"
                  + (f", {fr['falcon_batch_gflops_own']:.1f} GFLOP/s over its own scoring time "
                     f"({fr['fraction_of_ceiling_own']:.2f})" if fr.get('falcon_batch_gflops_own') else "")
                  + f"; numpy/OpenBLAS sgemm ceiling {fr['sgemm_ceiling_gflops']:.1f} GFLOP/s (load {fr['sgemm_loadavg'][0]:.2f}; "
                  + ", ".join(f"{k}: {v:.0f}" for k, v in fr["sgemm_shapes_gflops"].items()) + ")"]
        if fr.get("sgemm_sustained_gflops"):
            lines.append(f"numpy sustained at the job's shapes (one layer's GEMMs on 2048 rows, over and over for 8 s; best of "
                         f"{len(fr['sgemm_sustained_runs_gflops'])}): {fr['sgemm_sustained_gflops']:.1f} GFLOP/s; falcon-batch over "
                         f"its wall: {fr['fraction_of_sustained_wall']:.2f} of it")
    lines.append("")
    lines.append(f"load average (1, 5, 15 min) at start {tuple(round(x, 2) for x in res['machine']['loadavg_at_start'])}, "
                 f"at end {tuple(round(x, 2) for x in res['machine']['loadavg_at_end'])}")
    lines.append(f"falcon-batch's own summary: `{fb['own_summary']}`")
    if res["decode"]:
        half = any("falcon-batch f16 weights, f16 cache" in e for e in res["decode"].values())
        lines += ["", "Decode (greedy, one sequence), seconds per new token; the F16 GGUF against falcon-batch's f16 "
                  "weights with the f16 cache, the others against its f32 weights (f16 cache in brackets):", "",
                  "| context (prompt tokens) | falcon-batch s/token (f16 cache) | " + ("falcon-batch f16 weights, f16 cache | " if half else "") +
                  " | ".join(f"llama.cpp {n} s/token | falcon-batch / llama.cpp {n}" for n, _ in decode_ggufs) + " |",
                  "|---:|---:|" + ("---:|" if half else "") + "---:|---:|" * len(decode_ggufs)]
        for ctx, e in res["decode"].items():
            f16 = e.get("falcon-batch f16 cache")
            row = f"| {e['prompt_tokens']} | {e['falcon-batch']['s_per_token']:.4f}" + (f" ({f16['s_per_token']:.4f})" if f16 else "") + " | "
            if half:
                row += f"{e['falcon-batch f16 weights, f16 cache']['s_per_token']:.4f} | "
            row += " | ".join(f"{e['llama.cpp ' + n]['s_per_token']:.4f} | "
                              f"{e['llama.cpp ' + n]['ratio_fb_over_llama_s_per_token']:.2f}"
                              + (f" ({e['llama.cpp ' + n]['ratio_fb_f16_cache_over_llama_s_per_token']:.2f})"
                                 if "ratio_fb_f16_cache_over_llama_s_per_token" in e['llama.cpp ' + n] else "")
                              for n, _ in decode_ggufs)
            lines.append(row + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
