#!/usr/bin/env python3
"""HF transformers peer for scripts/bench_cpu.py: scores (prompt, choice) pairs the way lm-eval does.

    python scripts/bench_hf_lmeval.py --gguf models/SmolLM2-135M-Instruct.F32.gguf --ids ids.json \
        --threads 2 --out hf.json

Each (prompt, choice) pair is its own sequence, input = (prompt + choice)[:-1]; a document's
pairs are one right-padded batch; the choice's log-prob is the sum of log-softmax at its tokens.
The model is the F32 GGUF loaded by transformers (dequantized to float32 torch weights: the same
weights falcon-batch and llama.cpp F32 run). --ids is a JSON list of {"id", "prompt", "choices"}
token ids (the bench's own tokenization). Prints nothing; writes {"load_s", "score_s", "docs",
"logprobs": {id: [[choice, n_tokens, logprob], ...]}}.
"""
import argparse
import json
import os
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--ids", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    import torch
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(os.path.abspath(a.gguf)),
                                                 gguf_file=os.path.basename(a.gguf), dtype=torch.float32)
    model.eval()
    t1 = time.perf_counter()
    docs = json.load(open(a.ids))
    out = {}
    with torch.inference_mode():
        for d in docs:
            seqs = [(d["prompt"] + c)[:-1] for c in d["choices"]]
            width = max(len(s) for s in seqs)
            ids = torch.zeros((len(seqs), width), dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for i, s in enumerate(seqs):
                ids[i, : len(s)] = torch.tensor(s)
                mask[i, : len(s)] = 1
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
            res = []
            p = len(d["prompt"])
            for i, c in enumerate(d["choices"]):
                rows = logp[i, p - 1: p - 1 + len(c)]
                res.append([i, len(c), float(rows.gather(1, torch.tensor(c).unsqueeze(1)).sum())])
            out[d["id"]] = res
    t2 = time.perf_counter()
    with open(a.out, "w") as f:
        json.dump({"load_s": t1 - t0, "score_s": t2 - t1, "docs": len(docs), "logprobs": out}, f)


if __name__ == "__main__":
    main()
