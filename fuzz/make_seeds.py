"""Write the fuzz targets' seed corpora (fuzz/corpus/<target>/) from real, small files.

    /work/venv/bin/python fuzz/make_seeds.py [MODEL_DIR]

MODEL_DIR is `falcon-batch convert --from tests/fixtures/llama_tied --to MODEL_DIR` (its
manifest.json and smallest part are the manifest and safetensors seeds). Needs numpy,
safetensors and gguf. The seeds are committed; the corpora libFuzzer grows are not.
"""
import json
import pathlib
import sys

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, TokenType
from gguf.quants import quantize
from safetensors.numpy import save_file

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "fuzz" / "corpus"


def seeds(target):
    d = OUT / target
    d.mkdir(parents=True, exist_ok=True)
    return d


def safetensors_seeds(model_dir):
    d = seeds("safetensors_header")
    # A real part as convert writes it (the smallest: begin, the embeddings).
    (d / "begin.safetensors").write_bytes((model_dir / "begin.safetensors").read_bytes())
    # The same tensor names with tiny shapes, three dtypes, and a metadata block.
    rng = np.random.default_rng(0)
    save_file(
        {
            "attn.qkv.weight": rng.standard_normal((4, 2)).astype(np.float32),
            "attn.o.weight": rng.standard_normal((2, 2)).astype(np.float16),
            "norm.weight": np.ones(2, dtype=np.float32),
        },
        str(d / "tiny_layer.safetensors"),
        metadata={"format": "pt"},
    )
    save_file({}, str(d / "empty.safetensors"))


def gguf_seed(path, quant):
    """A one-layer llama GGUF with a byte-level BPE vocabulary, as convert reads it."""
    hidden, ff, vocab = 32, 32, 40
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ff)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    tokens = ["<|endoftext|>", "<|im_start|>"] + [chr(c) for c in range(ord("a"), ord("a") + vocab - 4)] + ["Ġ", "ab"]
    w.add_token_list(tokens)
    w.add_token_types([TokenType.CONTROL, TokenType.CONTROL] + [TokenType.NORMAL] * (vocab - 2))
    w.add_token_merges(["a b"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(0)
    w.add_add_bos_token(False)
    rng = np.random.default_rng(1)

    def tensor(name, shape, qtype=GGMLQuantizationType.F32):
        x = rng.standard_normal(shape).astype(np.float32)
        if qtype == GGMLQuantizationType.F32:
            w.add_tensor(name, x)
        elif qtype == GGMLQuantizationType.F16:
            w.add_tensor(name, x.astype(np.float16))
        else:
            w.add_tensor(name, quantize(x, qtype), raw_dtype=qtype)

    tensor("token_embd.weight", (vocab, hidden), quant)
    tensor("output_norm.weight", (hidden,))
    tensor("blk.0.attn_norm.weight", (hidden,))
    tensor("blk.0.attn_q.weight", (hidden, hidden), quant)
    tensor("blk.0.attn_k.weight", (hidden // 2, hidden), GGMLQuantizationType.F16)
    tensor("blk.0.attn_v.weight", (hidden // 2, hidden), GGMLQuantizationType.F16)
    tensor("blk.0.attn_output.weight", (hidden, hidden), GGMLQuantizationType.F16)
    tensor("blk.0.ffn_norm.weight", (hidden,))
    tensor("blk.0.ffn_gate.weight", (ff, hidden), GGMLQuantizationType.F16)
    tensor("blk.0.ffn_up.weight", (ff, hidden), GGMLQuantizationType.F16)
    tensor("blk.0.ffn_down.weight", (hidden, ff), GGMLQuantizationType.F16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def corpus_seeds():
    d = seeds("corpus_line")
    n = 0
    for name in ["sample.jsonl", "bad.jsonl"]:
        lines = (ROOT / "inputs" / name).read_bytes().split(b"\n")
        for i, line in enumerate(lines[:12]):
            if line.strip() and len(line) < 2000:
                (d / f"{name.split('.')[0]}_{i:02}.jsonl").write_bytes(line + b"\n")
                n += 1
    # The fixture tokenizer's own words, so some lines get as far as scoring.
    good = {"id": "t", "prompt": "t5 t6 t7", "choices": ["t8", "t9 t10"]}
    parts = {"id": "u", "text": "t5 t6", "question": "t7", "choices": ["t8"]}
    (d / "fixture_words.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(parts) + "\n" + json.dumps(good) + "\n")
    return n


def main():
    model_dir = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/fb-seed-model")
    safetensors_seeds(model_dir)
    seeds("manifest")
    (OUT / "manifest" / "manifest.json").write_bytes((model_dir / "manifest.json").read_bytes())
    d = seeds("gguf")
    gguf_seed(d / "tiny_f32.gguf", GGMLQuantizationType.F32)
    gguf_seed(d / "tiny_q8_0.gguf", GGMLQuantizationType.Q8_0)
    gguf_seed(d / "tiny_q4_1.gguf", GGMLQuantizationType.Q4_1)
    corpus_seeds()
    for t in sorted(OUT.iterdir()):
        files = list(t.iterdir())
        print(f"{t.name}: {len(files)} seeds, {sum(f.stat().st_size for f in files)} bytes")


if __name__ == "__main__":
    main()
