#!/usr/bin/env python3
"""Extract benchmark (issue 26): `falcon-batch extract` against `score` and against the peers
a user would otherwise use, on the sample corpus with SmolLM2-135M.

    python3 scripts/bench_extract.py --bin target/release/falcon-batch --model models/smollm2-135m \
        --docs inputs/sample.jsonl --hf-python /work/venv/bin/python

(a) `falcon-batch extract` of the corpus (wall time, one process, --threads threads): seconds
    per document, exact match of its best span against each document's `answer`.
(b) `falcon-batch score` of the same documents with their given `choices`: the ratio (a)/(b)
    (issue 26's target: extract within 2x of score).
(c) HF transformers the lm-eval way: every candidate span (scripts/extract_reference.py:
    the units, the split, the "\\n" end) its own request, prompt + span + end as one sequence,
    --hf-batch requests per right-padded batch, no cache shared. It is far too slow for every
    candidate (~1,800 a document): it times --hf-cands candidates spread over each of the
    first --hf-docs documents and extrapolates to all of the document's candidates; the JSON
    says so ("extrapolated_from").
(d) llguidance (the engine of guidance's substring constraint) with greedy decoding on the
    same model: the Lark grammar `start: " " SPAN "\\n"`, `SPAN: %regex {"substring_words":
    <the document's text>}` (the span after "Answer:" must be words of the document, then a
    newline, as extract's candidates are), the token mask applied to HF's logits each step,
    argmax, until the grammar ends or --max-new tokens. Seconds per document, exact match.
    No probability for the span comes out of it (the issue's point): only its greedy text.
(e) long documents: sample texts joined to ~--long-tokens tokens (the question and choices of
    the first sample document), --long-docs of them: documents per hour for extract and
    for score, and extract's passes and tree tokens (rows beyond the prompt) per document,
    the quantities `falcon-batch plan --extract` takes as --passes and --tree-rows.
    --long-only runs (e) alone (a quick check: --long-docs 1 --hf-python '').
(c) and (d) need torch, transformers and llguidance: they run in --hf-python (this script
again, --peers-only), the same weights loaded from the model directory
(scripts/bench_hf_lmeval.py's load_llama). (a), (b), (e) need the extract command.

Prints a markdown table; writes --out (JSON).
"""
import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import extract_reference as xr  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", default="target/release/falcon-batch")
    ap.add_argument("--model", default="models/smollm2-135m", help="falcon-batch model dir (llama family, for the HF peers too)")
    ap.add_argument("--docs", default="inputs/sample.jsonl")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1, help="runs of (a), (b), (e); the min is kept")
    ap.add_argument("--hf-python", default="", help="a Python with torch, transformers and llguidance for (c), (d) ('' skips them)")
    ap.add_argument("--hf-docs", type=int, default=4, help="documents (c) times")
    ap.add_argument("--hf-cands", type=int, default=64, help="candidates (c) times per document")
    ap.add_argument("--hf-batch", type=int, default=16, help="requests per batch in (c)")
    ap.add_argument("--llg-docs", type=int, default=0, help="documents (d) decodes (0: all)")
    ap.add_argument("--max-new", type=int, default=40, help="token limit of (d)'s greedy decoding")
    ap.add_argument("--long-tokens", type=int, default=1500)
    ap.add_argument("--long-docs", type=int, default=2)
    ap.add_argument("--skip-falcon", action="store_true", help="only the peers (c), (d)")
    ap.add_argument("--long-only", action="store_true", help="only the long documents (e): skips (a), (b) and the peers")
    ap.add_argument("--h5dump", default="h5dump", help="reads passes and tree tokens per document from extract's HDF5 file")
    ap.add_argument("--peers-only", default="", help=argparse.SUPPRESS)  # internal: write the peers' JSON here
    ap.add_argument("--out", default="results/bench-extract.json")
    return ap.parse_args(argv)


def load_docs(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(l) for l in f if l.strip()]


def exact(a, b):
    return a is not None and b is not None and a.strip() == b.strip()


# --- falcon-batch ---------------------------------------------------------------------------

def fb_run(args, command, docs_path, workdir, extra=()):
    """Wall seconds of `falcon-batch <command>` over `docs_path`, its CSV rows and the command."""
    out = os.path.join(workdir, f"{command}.h5")
    out_csv = os.path.join(workdir, f"{command}.csv")
    cmd = [args.bin, command, "--model", args.model, "--docs", docs_path, "--out", out, "--csv", out_csv,
           "--overwrite", "--quiet", *extra]
    best, rows = None, None
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        p = subprocess.run(cmd, env=dict(os.environ, RAYON_NUM_THREADS=str(args.threads)), capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed (rc={p.returncode}):\n{p.stderr[-4000:]}")
        best = wall if best is None else min(best, wall)
        with open(out_csv, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    return best, rows, " ".join(cmd)


def h5_column(args, path, dataset):
    """One 1-D dataset of a results file, read with h5dump (the bench needs no h5py)."""
    p = subprocess.run([args.h5dump, "-y", "-w", "0", "-d", dataset, path], capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"{args.h5dump} -d {dataset} {path} failed (rc={p.returncode}):\n{p.stderr[-2000:]}")
    body = p.stdout.split("DATA {", 1)[1].split("}", 1)[0]
    return [int(v) for v in body.replace(",", " ").split()]


def search_cost(args, workdir):
    """Passes and tree tokens per document of the last extract run (its HDF5 file's /docs)."""
    out = os.path.join(workdir, "extract.h5")
    passes, tree = h5_column(args, out, "/docs/passes"), h5_column(args, out, "/docs/tree_tokens")
    n = max(len(passes), 1)
    return dict(passes=passes, tree_tokens=tree, mean_passes=sum(passes) / n, mean_tree_tokens=sum(tree) / n)


def best_spans(rows):
    """extract's CSV: document id -> its rank-1 text."""
    return {r["id"]: r["text"] for r in rows if r["rank"] == "1"}


def long_corpus(docs, tokens, n, path, count_tokens):
    """`n` documents of ~`tokens` tokens: sample texts joined, each copy starting one text later."""
    lines = []
    for k in range(n):
        parts, text = [], ""
        i = k
        while count_tokens(xr.render({"text": text, "question": docs[0]["question"]})[0]) < tokens:
            parts.append(docs[i % len(docs)]["text"])
            text = " ".join(parts)
            i += 1
        lines.append({"id": f"long-{k}", "text": text, "question": docs[0]["question"], "choices": docs[0]["choices"],
                      "answer": docs[0]["answer"]})
    with open(path, "w", encoding="utf-8") as f:
        for l in lines:
            f.write(json.dumps(l, ensure_ascii=False) + "\n")
    return lines


def falcon(args, docs, workdir, count_tokens):
    res = {}
    if not args.long_only:
        t_ex, rows, cmd = fb_run(args, "extract", args.docs, workdir)
        best = best_spans(rows)
        res["extract"] = dict(seconds=t_ex, per_doc_s=t_ex / len(docs), command=cmd,
                              exact_match=sum(exact(best.get(d["id"]), d.get("answer")) for d in docs), docs=len(docs),
                              best={d["id"]: best.get(d["id"]) for d in docs}, **search_cost(args, workdir))
        t_sc, _, cmd = fb_run(args, "score", args.docs, workdir)
        res["score"] = dict(seconds=t_sc, per_doc_s=t_sc / len(docs), command=cmd)
        res["extract_over_score"] = t_ex / t_sc
    long_path = os.path.join(workdir, "long.jsonl")
    lines = long_corpus(docs, args.long_tokens, args.long_docs, long_path, count_tokens)
    t_lx, _, _ = fb_run(args, "extract", long_path, workdir)
    cost = search_cost(args, workdir)
    t_ls, _, _ = fb_run(args, "score", long_path, workdir)
    n_c = [len(xr.candidates(l["text"])[0]) for l in lines]
    res["long"] = dict(docs=len(lines), tokens=[count_tokens(xr.render(l)[0]) for l in lines], candidates=n_c,
                       extract_docs_per_hour=3600 * len(lines) / t_lx, score_docs_per_hour=3600 * len(lines) / t_ls,
                       extract_s=t_lx, score_s=t_ls, **cost)
    return res


# --- the peers (torch) ----------------------------------------------------------------------

def peers(args, docs):
    import numpy as np
    import torch
    from tokenizers import Tokenizer

    from bench_hf_lmeval import load_llama

    torch.set_num_threads(args.threads)
    model = load_llama(args.model)
    tok = Tokenizer.from_file(os.path.join(args.model, "tokenizer.json"))
    manifest = json.load(open(os.path.join(args.model, "manifest.json")))
    eos = manifest["config"]["eos_token_ids"][0]
    encode = lambda text: tok.encode(text).ids  # noqa: E731
    end_ids = tok.encode("\n", add_special_tokens=False).ids
    out = {"torch": torch.__version__, "threads": args.threads}

    # (c) every candidate its own request, the lm-eval way
    hf = []
    for d in docs[: args.hf_docs]:
        prompt, source = xr.render(d)
        cands, _ = xr.candidates(source)
        step = max(1, len(cands) // args.hf_cands)
        picked = cands[::step][: args.hf_cands]
        prompt_ids, spans = xr.split(encode, prompt, [t for t, _, _ in picked])
        seqs = [prompt_ids + s + end_ids for s in spans]
        scores = []
        t0 = time.perf_counter()
        with torch.inference_mode():
            for b in range(0, len(seqs), args.hf_batch):
                batch = seqs[b:b + args.hf_batch]
                width = max(map(len, batch)) - 1
                ids = torch.zeros((len(batch), width), dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for i, s in enumerate(batch):
                    ids[i, : len(s) - 1] = torch.tensor(s[:-1])
                    mask[i, : len(s) - 1] = 1
                lp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
                for i, s in enumerate(batch):
                    tgt = torch.tensor(s[len(prompt_ids):])
                    scores.append(float(lp[i, len(prompt_ids) - 1: len(s) - 1].gather(1, tgt[:, None]).sum()))
        took = time.perf_counter() - t0
        hf.append(dict(id=d["id"], candidates=len(cands), timed=len(picked), timed_s=took,
                       per_doc_s=took / len(picked) * len(cands)))
        print(f"  (c) {d['id']}: {len(picked)} of {len(cands)} candidates in {took:.1f} s -> {hf[-1]['per_doc_s']:.0f} s per document",
              file=sys.stderr, flush=True)
    out["hf_lmeval"] = dict(docs=hf, per_doc_s=sum(h["per_doc_s"] for h in hf) / max(1, len(hf)),
                            extrapolated_from=f"{args.hf_cands} candidates per document, batches of {args.hf_batch}")

    # (d) llguidance's substring constraint, greedy
    import llguidance
    from llguidance import LLMatcher, LLTokenizer

    with open(os.path.join(args.model, "tokenizer.json"), encoding="utf-8") as f:
        lltok = LLTokenizer(f.read(), eos_token=eos)
    vocab = model.config.vocab_size
    llg = []
    for d in docs[: args.llg_docs or len(docs)]:
        prompt, source = xr.render(d)
        lark = 'start: " " SPAN "\\n"\nSPAN: %regex ' + json.dumps({"substring_words": source})
        t0 = time.perf_counter()
        m = LLMatcher(lltok, LLMatcher.grammar_from_lark(lark))
        if m.is_error():
            sys.exit(f"llguidance refused the grammar of {d['id']}: {m.get_error()}")
        new, reason = [], "max_new"
        with torch.inference_mode():
            o = model(input_ids=torch.tensor([encode(prompt)]), use_cache=True, logits_to_keep=1)  # as generate() does
            past, logits = o.past_key_values, o.logits[0, -1]
            for _ in range(args.max_new):
                allowed = np.unpackbits(np.frombuffer(m.compute_bitmask(), dtype=np.uint8), bitorder="little")[:vocab]
                masked = logits.clone()
                masked[torch.from_numpy(allowed[: logits.shape[0]] == 0)] = float("-inf")
                t = int(torch.argmax(masked))
                if not m.consume_token(t):
                    sys.exit(f"llguidance refused its own allowed token {t} in {d['id']}: {m.get_error()}")
                new.append(t)
                if m.is_stopped() or t == eos:
                    reason = "grammar"
                    break
                o = model(input_ids=torch.tensor([[t]]), past_key_values=past, use_cache=True)
                past, logits = o.past_key_values, o.logits[0, -1]
        took = time.perf_counter() - t0
        text = tok.decode(new)
        span = text[1:] if text.startswith(" ") else text
        span = span.split("\n")[0]
        llg.append(dict(id=d["id"], seconds=took, tokens=len(new), text=span, stop=reason, exact=exact(span, d.get("answer"))))
        print(f"  (d) {d['id']}: {span!r} ({'=' if llg[-1]['exact'] else '!='} {d.get('answer')!r}), {len(new)} tokens, {took:.2f} s",
              file=sys.stderr, flush=True)
    out["llguidance"] = dict(version=llguidance.__version__ if hasattr(llguidance, "__version__") else "", docs=llg,
                             per_doc_s=sum(x["seconds"] for x in llg) / max(1, len(llg)),
                             exact_match=sum(x["exact"] for x in llg), n=len(llg))
    return out


def run_peers(args):
    """(c), (d) in --hf-python: this script again, writing their JSON to a file."""
    if not args.hf_python:
        return None
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    argv = [args.hf_python, os.path.abspath(__file__), "--peers-only", path, "--model", args.model, "--docs", args.docs,
            "--threads", str(args.threads), "--hf-docs", str(args.hf_docs), "--hf-cands", str(args.hf_cands),
            "--hf-batch", str(args.hf_batch), "--llg-docs", str(args.llg_docs), "--max-new", str(args.max_new)]
    p = subprocess.run(argv)
    if p.returncode != 0:
        sys.exit(f"the peers failed (rc={p.returncode}): {' '.join(argv)}")
    with open(path) as f:
        r = json.load(f)
    os.unlink(path)
    return r


def markdown(res):
    rows = ["| figure (SmolLM2-135M, %d sample documents, %d threads) | value |" % (res["docs"], res["threads"]), "|---|---:|"]
    fb, pe = res.get("falcon"), res.get("peers")
    if fb and "extract" in fb:
        x, s = fb["extract"], fb["score"]
        rows += [f"| (a) extract, s/document | {x['per_doc_s']:.3f} |",
                 f"| (a) extract, passes / tree tokens per document (mean) | {x['mean_passes']:.1f} / {x['mean_tree_tokens']:.0f} |",
                 f"| (a) extract, exact match of the best span against `answer` | {x['exact_match']}/{x['docs']} |",
                 f"| (b) score with the given choices, s/document | {s['per_doc_s']:.3f} |",
                 f"| (a)/(b) extract over score (target <= 2) | **{fb['extract_over_score']:.2f}** |"]
    if pe:
        h, g = pe["hf_lmeval"], pe["llguidance"]
        if h["docs"]:
            rows += [f"| (c) HF transformers, every candidate its own request, s/document (extrapolated from {h['extrapolated_from']}) | {h['per_doc_s']:.0f} |"]
        rows += [f"| (d) llguidance substring constraint, greedy, s/document | {g['per_doc_s']:.3f} |",
                 f"| (d) llguidance exact match against `answer` | {g['exact_match']}/{g['n']} |"]
        if fb and "extract" in fb:
            if h["docs"]:
                rows += [f"| (c)/(a) HF brute force over extract | {h['per_doc_s'] / fb['extract']['per_doc_s']:.0f}x |"]
            rows += [f"| (d)/(a) llguidance over extract | {g['per_doc_s'] / fb['extract']['per_doc_s']:.2f}x |"]
    if fb:
        l = fb["long"]
        rows += [f"| (e) ~{sum(l['tokens']) // len(l['tokens'])}-token documents ({sum(l['candidates']) // len(l['candidates'])} candidates): extract documents/hour | {l['extract_docs_per_hour']:.0f} |",
                 f"| (e) the same, score documents/hour | {l['score_docs_per_hour']:.0f} |",
                 f"| (e) extract over score, time per document | **{l['extract_s'] / l['score_s']:.2f}** |",
                 f"| (e) extract, passes / tree tokens per document (mean; `plan --extract --passes --tree-rows`) | {l['mean_passes']:.1f} / {l['mean_tree_tokens']:.0f} |"]
    return "\n".join(rows)


def main():
    args = parse_args()
    docs = load_docs(args.docs)
    if args.peers_only:
        with open(args.peers_only, "w") as f:
            json.dump(peers(args, docs), f)
        return
    res = {"docs": len(docs), "threads": args.threads, "machine": platform.processor() or platform.machine(),
           "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "load_before": os.getloadavg()}
    if not args.skip_falcon:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(os.path.join(args.model, "tokenizer.json"))
        with tempfile.TemporaryDirectory() as workdir:
            res["falcon"] = falcon(args, docs, workdir, lambda t: len(tok.encode(t).ids))
    res["peers"] = None if args.long_only else run_peers(args)
    res["load_after"] = os.getloadavg()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(markdown(res))
    print(f"\n(written to {args.out}; load average {res['load_before'][0]:.1f} before, {res['load_after'][0]:.1f} after)")


if __name__ == "__main__":
    main()
