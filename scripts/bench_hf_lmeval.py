#!/usr/bin/env python3
"""HF transformers peer for scripts/bench_cpu.py: scores (prompt, choice) pairs the way lm-eval does.

    python scripts/bench_hf_lmeval.py --model models/smollm2-135m --ids ids.json \
        --threads 2 --out hf.json

Each (prompt, choice) pair is its own sequence, input = (prompt + choice)[:-1]; a document's
pairs are one right-padded batch; the choice's log-prob is the sum of log-softmax at its tokens.
The model is transformers' LlamaForCausalLM (float32) built from the falcon-batch model dir's
config and loaded with its tensors (HF layout already: the fused qkv is split back), so it runs
the very weights falcon-batch and llama.cpp F32 run. Llama-family dirs only. --ids is a JSON list of {"id", "prompt", "choices"}
token ids (the bench's own tokenization). Prints nothing; writes {"load_s", "score_s", "docs",
"logprobs": {id: [[choice, n_tokens, logprob], ...]}}.
"""
import argparse
import json
import os
import time


def load_llama(model_dir):
    import torch
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM
    manifest = json.load(open(os.path.join(model_dir, "manifest.json")))
    c = manifest["config"]
    if c["family"] != "llama" or c.get("rope_scaling") or c.get("sliding_window"):
        raise SystemExit(f"{model_dir}/manifest.json: the HF peer runs plain Llama configs only "
                         f"(family {c['family']!r}, rope_scaling {c.get('rope_scaling')!r}, sliding_window {c.get('sliding_window')!r})")
    cfg = LlamaConfig(vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
                      num_hidden_layers=c["n_layers"], num_attention_heads=c["n_heads"], num_key_value_heads=c["n_kv_heads"],
                      head_dim=c["head_dim"], rms_norm_eps=c["norm_eps"], max_position_embeddings=c["max_position"],
                      rope_parameters={"rope_type": "default", "rope_theta": c["rope_theta"]},
                      tie_word_embeddings=c["tied_embeddings"], attention_bias=c["attention_bias"], mlp_bias=c["mlp_bias"])
    model = LlamaForCausalLM(cfg).to(torch.float32)
    h, kv, d = c["n_heads"], c["n_kv_heads"], c["head_dim"]
    sd = {}
    part = lambda name: load_file(os.path.join(model_dir, name + ".safetensors"))
    sd["model.embed_tokens.weight"] = part("begin")["embed.weight"]
    for i in range(c["n_layers"]):
        t = part(f"layer_{i:03d}")
        pre = f"model.layers.{i}."
        q, k, v = torch.split(t["attn.qkv.weight"], [h * d, kv * d, kv * d])
        sd.update({pre + "self_attn.q_proj.weight": q, pre + "self_attn.k_proj.weight": k, pre + "self_attn.v_proj.weight": v,
                   pre + "self_attn.o_proj.weight": t["attn.out.weight"], pre + "input_layernorm.weight": t["attn_norm.weight"],
                   pre + "post_attention_layernorm.weight": t["mlp_norm.weight"], pre + "mlp.gate_proj.weight": t["mlp.gate.weight"],
                   pre + "mlp.up_proj.weight": t["mlp.up.weight"], pre + "mlp.down_proj.weight": t["mlp.down.weight"]})
    end = part("end")
    sd["model.norm.weight"] = end["norm.weight"]
    sd["lm_head.weight"] = end["lm_head.weight"]
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing or unexpected:
        raise SystemExit(f"{model_dir}: tensors missing {missing}, unexpected {unexpected}")
    return model.eval()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="falcon-batch model dir (llama family)")
    ap.add_argument("--ids", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    import torch
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    model = load_llama(a.model)
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
