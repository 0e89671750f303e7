#!/usr/bin/env python3
"""The goldens of `falcon-batch extract` (tests/extract_golden.rs): HF transformers scoring
EVERY candidate span of a document on its own (scripts/extract_reference.py has the rules).

Run from the repository root (the fixtures of tests/fixtures must exist; SmolLM2 needs
`make fetch-model`):

    /work/venv/bin/python scripts/make_extract_reference.py              # everything
    /work/venv/bin/python scripts/make_extract_reference.py falcon_7b    # one golden
    /work/venv/bin/python scripts/make_extract_reference.py smollm2 --smol-docs 6

SmolLM2 costs ~10-25 minutes per sample document on 2 cores (~1,800 candidates, each
prompt + span + end on its own from the prompt's cached keys and values): its golden keeps the
documents an existing smollm2.json already holds (made the same way) and adds the next ones.

(in general: a venv with torch transformers tokenizers safetensors gguf numpy.)
Writes tests/fixtures/extract/:
  docs.jsonl      the fixture corpus: both corpus forms ({"id","text","question"} rendered by
                  the default template, and {"id","prompt","source"}, one prompt ending in a
                  space and one in a newline, whose whitespace moves into every candidate).
                  Only characters of tests/fixtures/bpe_text.txt (the tiny tokenizers' text).
  <name>.json     one golden per tiny HF fixture of tests/fixtures (float64 model, as their
                  golden.json), span end "\\n"; llama_tied_eos.json with the EOS id as the end.
  smollm2.json    SmolLM2-135M-Instruct (the Q4_1 GGUF, which transformers dequantizes to
                  float32: the weights `falcon-batch convert` makes), float64 log-softmax over
                  float32 logits, the first --smol-docs documents of inputs/sample.jsonl.

Golden file:
  {"name", "model": path of the HF fixture dir or GGUF, "corpus": path of the corpus,
   "dtype": "float64" | "float32", "torch_version", "transformers_version",
   "top_k": 5, "max_span_units": 16, "span_end": "\\n" | "eos", "end_ids": [int],
   "target_delimiter": " ", "template": the default template,
   "docs": [{"id", "prompt_ids", "n_units", "n_candidates", "max_candidate_tokens",
             "top": the best TOP_K + 5 candidates, best first (ties to the earlier first
                    occurrence): {"text", "start", "end", "score", "span_logprob", "tokens", "ids"},
             "min_gap": the smallest score difference between neighbours of the first TOP_K + 1
                        (a reader should not insist on an order closer than its tolerance),
             "seconds": time HF took for the document}]}
Only the first TOP_K are what `extract --top-k 5` must print; the rest let a reader look up
the score of a near-tied candidate.
"""

import argparse
import json
import os
import sys
import time

import extract_reference as xr  # beside this script

ROOT = xr.ROOT
OUT = os.path.join(ROOT, "tests", "fixtures", "extract")
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Every tiny HF fixture directory of tests/fixtures (make_fixtures.py).
FAMILIES = ["falcon_7b", "falcon_40b", "falcon_new_1ln", "falcon_seq_bias", "falcon_untied", "falcon_linear",
            "llama_gqa", "llama_tied", "llama31", "llama_linear", "llama3_params", "mistral", "qwen2", "qwen2_untied"]

# Short: the tiny tokenizers (vocab ~100) make a token of almost every character, the
# fixtures' context is 128 tokens and Mistral's window 64 for the prompt and the longest
# candidate together. A golden holds the documents that fit its model (both forms always).
DOCS = [
    {"id": "t-due", "text": "Total due: $98.50, not paid.", "question": "Due?"},
    {"id": "t-signer", "text": "The letter was signed by Ana Ruiz.", "question": "Who signed it?"},
    {"id": "t-short", "text": "Signed by Ben Holt.", "question": "Who?"},
    {"id": "p-currency", "prompt": "Invoice 44 is in Swiss francs.\nThe currency is", "source": "Invoice 44 is in Swiss francs."},
    {"id": "p-space", "prompt": "Ship to Paris, not Lyon.\nShip to: ", "source": "Ship to Paris, not Lyon."},
    {"id": "p-newline", "prompt": "Paid on May 3.\nDate:\n", "source": "Paid on May 3."},
    {"id": "p-long", "prompt": "Invoice 67 is for 6 items, invoice 76 for 7, paid in full.\nAnswer:",
     "source": "Invoice 67 is for 6 items, invoice 76 for 7, paid in full."},
]


def context_limit(cfg):
    window = getattr(cfg, "sliding_window", None) if cfg.model_type == "mistral" else None
    return min(cfg.max_position_embeddings, window) if window else cfg.max_position_embeddings


def fits(encode, line, end_ids, max_len):
    """Whether the prompt and the longest candidate with its end fit the model's context."""
    prompt, source = xr.render(line)
    prompt_ids, spans = xr.split(encode, prompt, [t for t, _, _ in xr.candidates(source)[0]])
    return len(prompt_ids) + max(map(len, spans)) + len(end_ids) <= max_len


def reusable(name, end_ids, dtype):
    """The documents of an existing golden made the same way (SmolLM2's take minutes each)."""
    path = os.path.join(OUT, name + ".json")
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        g = json.load(f)
    same = (g["end_ids"], g["dtype"], g["top_k"], g["max_span_units"], g["template"]) == (
        end_ids, dtype, xr.TOP_K, xr.MAX_SPAN_UNITS, xr.DEFAULT_TEMPLATE)
    return {d["id"]: d for d in g["docs"]} if same else {}


def golden(name, model_path, corpus_path, lines, torch, model, encode, end_ids, span_end, dtype, max_len, reuse=False,
           both_forms=True):
    docs = []
    kept = reusable(name, end_ids, dtype) if reuse else {}
    for line in lines:
        if line["id"] in kept:
            docs.append(kept[line["id"]])
            print(f"  {name} {line['id']}: kept from the existing golden")
            continue
        if not fits(encode, line, end_ids, max_len):
            print(f"  {name} {line['id']}: over the model's {max_len} tokens, left out")
            continue
        t0 = time.perf_counter()
        r = xr.extract_document(torch, model, encode, line, end_ids, max_len=max_len)
        took = time.perf_counter() - t0
        scores = [c["score"] for c in r["top"][: xr.TOP_K + 1]]
        gaps = [a - b for a, b in zip(scores, scores[1:])]
        docs.append(dict(id=line["id"], prompt_ids=r["prompt_ids"], n_units=r["n_units"], n_candidates=r["n_candidates"],
                         max_candidate_tokens=r["max_candidate_tokens"], top=r["top"],
                         min_gap=min(gaps) if gaps else None, seconds=round(took, 3)))
        best = r["top"][0]
        print(f"  {name} {line['id']}: {r['n_units']} units, {r['n_candidates']} candidates, best {best['text']!r} "
              f"{best['score']:.4f}, min gap {docs[-1]['min_gap']}, {took:.1f} s", flush=True)
        write_golden(name, model_path, corpus_path, torch, end_ids, span_end, dtype, docs)  # each document kept as it comes
    if both_forms:
        forms = {"prompt" in d for d in lines if d["id"] in {g["id"] for g in docs}}
        assert forms == {True, False}, f"{name}: both corpus forms must fit the model's {max_len} tokens"


def write_golden(name, model_path, corpus_path, torch, end_ids, span_end, dtype, docs):
    import transformers

    g = dict(name=name, model=model_path, corpus=corpus_path, dtype=dtype, torch_version=torch.__version__,
             transformers_version=transformers.__version__, top_k=xr.TOP_K, max_span_units=xr.MAX_SPAN_UNITS,
             span_end=span_end, end_ids=end_ids, target_delimiter=xr.lm_eval_split.TARGET_DELIMITER,
             template=xr.DEFAULT_TEMPLATE, docs=docs)
    path = os.path.join(OUT, name + ".json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(g, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"wrote {os.path.relpath(path, ROOT)}")


def write_docs():
    with open(os.path.join(FIXTURES, "bpe_text.txt"), encoding="utf-8") as f:
        alphabet = set(f.read())
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "docs.jsonl"), "w", encoding="utf-8") as f:
        for d in DOCS:
            for k, v in d.items():
                if k == "id":
                    continue
                assert set(v) <= alphabet, (d["id"], k, set(v) - alphabet)
            f.write(json.dumps(d, ensure_ascii=False) + "\n")


def fixture(name, torch, span_end="\n"):
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    d = os.path.join(FIXTURES, name.removesuffix("_eos"))
    tok = Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
    model = AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager").double().eval()
    encode = lambda text: tok.encode(text).ids  # noqa: E731  (special tokens as the tokenizer adds them)
    for line in DOCS:  # the tiny vocabularies must spell every candidate back
        prompt, source = xr.render(line)
        for text, _, _ in xr.candidates(source)[0]:
            _, ids = xr.split(encode, prompt, [text])
            assert tok.decode(ids[0]).endswith(text), (name, line["id"], text, tok.decode(ids[0]))
    end_ids = [model.config.eos_token_id] if span_end == "eos" else tok.encode("\n", add_special_tokens=False).ids
    golden(name, os.path.relpath(d, ROOT), "tests/fixtures/extract/docs.jsonl", DOCS, torch, model, encode, end_ids,
           span_end, "float64", context_limit(model.config))


def smollm2(torch, n_docs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    models = os.path.join(ROOT, "models")
    if not os.path.exists(os.path.join(models, GGUF)):
        sys.exit(f"models/{GGUF} is missing: run `make fetch-model` first")
    tok = AutoTokenizer.from_pretrained(models, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(models, gguf_file=GGUF, dtype=torch.float32).eval()
    with open(os.path.join(ROOT, "inputs", "sample.jsonl"), encoding="utf-8") as f:
        lines = [json.loads(l) for l in f if l.strip()][:n_docs]
    encode = lambda text: tok(text, add_special_tokens=True).input_ids  # noqa: E731
    end_ids = tok("\n", add_special_tokens=False).input_ids
    golden("smollm2", f"models/{GGUF}", "inputs/sample.jsonl", lines, torch, model, encode, end_ids, "\n", "float32",
           model.config.max_position_embeddings, reuse=True, both_forms=False)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("only", nargs="*", help="golden names (default: all)")
    ap.add_argument("--smol-docs", type=int, default=26, help="first N sample documents for smollm2.json")
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    names = a.only or FAMILIES + ["llama_tied_eos", "smollm2"]
    write_docs()
    for n in names:
        t0 = time.perf_counter()
        if n == "smollm2":
            smollm2(torch, a.smol_docs)
        else:
            fixture(n, torch, "eos" if n.endswith("_eos") else "\n")
        print(f"{n}: {time.perf_counter() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    main()
