#!/usr/bin/env python3
"""Write a large random Llama-style HF checkpoint (sharded safetensors) for memory tests.

    /work/venv/bin/python scripts/make_big_checkpoint.py /tmp/big-hf [--layers 10]

Default: hidden 2048, 32 heads / 4 KV heads, ffn 5632, vocab 32000, 10 layers, f32 (numpy
has no bf16): about 2.3 GB in 5 shards. One shard is generated and written at a time, so
this script itself needs only about one shard of memory. Values are random; the model is
only for measuring the converter, not for running.
"""
import argparse
import json
import os

import numpy as np
from safetensors.numpy import save_file


def layer_shapes(i, c, h, kv, f):
    d = c // h
    p = f"model.layers.{i}"
    return {
        f"{p}.input_layernorm.weight": (c,),
        f"{p}.post_attention_layernorm.weight": (c,),
        f"{p}.self_attn.q_proj.weight": (h * d, c),
        f"{p}.self_attn.k_proj.weight": (kv * d, c),
        f"{p}.self_attn.v_proj.weight": (kv * d, c),
        f"{p}.self_attn.o_proj.weight": (c, h * d),
        f"{p}.mlp.gate_proj.weight": (f, c),
        f"{p}.mlp.up_proj.weight": (f, c),
        f"{p}.mlp.down_proj.weight": (c, f),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--layers-per-shard", type=int, default=2)
    a = ap.parse_args()
    c, h, kv, f, v = a.hidden, a.heads, a.kv_heads, a.ffn, a.vocab
    os.makedirs(a.out, exist_ok=False)

    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": c,
        "num_attention_heads": h, "num_key_value_heads": kv, "num_hidden_layers": a.layers,
        "intermediate_size": f, "vocab_size": v, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "torch_dtype": "float32", "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2,
    }
    with open(os.path.join(a.out, "config.json"), "w") as fh:
        json.dump(config, fh, indent=2)
    # A tiny WordLevel tokenizer: convert copies it, the weights do not depend on it.
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
        "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
        "model": {"type": "WordLevel", "vocab": {"<unk>": 0, "a": 1, "b": 2}, "unk_token": "<unk>"},
    }
    with open(os.path.join(a.out, "tokenizer.json"), "w") as fh:
        json.dump(tokenizer, fh)

    # Shard k holds layers [k*L, (k+1)*L); the first also holds the embeddings, the last the head.
    groups = [list(range(s, min(s + a.layers_per_shard, a.layers))) for s in range(0, a.layers, a.layers_per_shard)]
    rng = np.random.default_rng(0)
    weight_map, total = {}, 0
    for k, layers in enumerate(groups):
        shapes = {}
        if k == 0:
            shapes["model.embed_tokens.weight"] = (v, c)
        for i in layers:
            shapes.update(layer_shapes(i, c, h, kv, f))
        if k == len(groups) - 1:
            shapes["model.norm.weight"] = (c,)
            shapes["lm_head.weight"] = (v, c)
        tensors = {n: (rng.random(s, dtype=np.float32) - 0.5) * 0.02 for n, s in shapes.items()}
        name = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(tensors, os.path.join(a.out, name))
        total += sum(t.nbytes for t in tensors.values())
        weight_map.update({n: name for n in tensors})
        del tensors
        print(f"wrote {name}", flush=True)
    with open(os.path.join(a.out, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=2)
    print(f"{a.out}: {total / 1e9:.2f} GB of weights in {len(groups)} shards")


if __name__ == "__main__":
    main()
