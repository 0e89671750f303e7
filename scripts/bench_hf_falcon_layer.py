#!/usr/bin/env python3
"""Peer timing for `falcon-batch bench`: Hugging Face transformers' FalconDecoderLayer
(bf16, sdpa attention) at the same shapes, on the same GPU, printed as the same table
and JSON, so the two can be divided.

    python3 scripts/bench_hf_falcon_layer.py --synthetic falcon-180b --out results/bench-hf.json

Shapes: T = 100, 2048 (one causal document) and 4 x 2048 (four documents packed in one
sequence with a block-diagonal causal mask, the closest HF gets to falcon-batch's packed
token trees; HF has no choice-tree mask, so choice rows are plain causal here).
Needs torch with CUDA and transformers; without a GPU it says so and exits 2.
"""
import argparse
import json
import os
import sys
import time

PRESETS = {
    # hidden, heads, kv heads, new_decoder_architecture
    "falcon-180b": dict(hidden_size=14848, num_attention_heads=232, num_kv_heads=8, new_decoder_architecture=True),
    "falcon-40b": dict(hidden_size=8192, num_attention_heads=128, num_kv_heads=8, new_decoder_architecture=True),
    "falcon-7b": dict(hidden_size=4544, num_attention_heads=71, num_kv_heads=1, new_decoder_architecture=False, multi_query=True),
    "tiny": dict(hidden_size=256, num_attention_heads=8, num_kv_heads=2, new_decoder_architecture=True),
}
SHAPES = [("100", 1, 100), ("2048", 1, 2048), ("4x2048", 4, 2048)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--synthetic", default="falcon-7b", choices=sorted(PRESETS))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="results/bench-hf.json")
    args = ap.parse_args()

    try:
        import torch
        from transformers import FalconConfig
        from transformers.models.falcon.modeling_falcon import FalconDecoderLayer
    except ImportError as e:
        print(f"bench_hf_falcon_layer: needs torch and transformers ({e})", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("bench_hf_falcon_layer: no CUDA GPU visible to torch; this peer benchmark only runs on a GPU", file=sys.stderr)
        return 2

    dev = torch.device("cuda")
    cfg = FalconConfig(**PRESETS[args.synthetic], parallel_attn=True, bias=False, alibi=False,
                       num_hidden_layers=1, vocab_size=65024, max_position_embeddings=2048)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    layer = FalconDecoderLayer(cfg, layer_idx=0).to(device=dev, dtype=torch.bfloat16).eval()
    layer_bytes = sum(p.numel() * p.element_size() for p in layer.parameters())
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    try:
        from transformers.models.falcon.modeling_falcon import FalconRotaryEmbedding
        rotary = FalconRotaryEmbedding(config=cfg).to(dev)
    except (ImportError, TypeError):
        rotary = None

    timings = []
    for label, docs, rows in SHAPES:
        t = docs * rows
        x = torch.randn(1, t, cfg.hidden_size, device=dev, dtype=torch.bfloat16)
        pos = torch.arange(rows, device=dev).repeat(docs).unsqueeze(0)
        # Additive mask (1, 1, T, T): causal within each packed document. sdpa takes it as is.
        doc = torch.arange(t, device=dev) // rows
        idx = torch.arange(t, device=dev)
        allowed = (doc[:, None] == doc[None, :]) & (idx[None, :] <= idx[:, None])
        mask = torch.zeros(t, t, device=dev, dtype=torch.bfloat16).masked_fill(~allowed, float("-inf"))[None, None]
        kwargs = dict(attention_mask=mask, position_ids=pos, alibi=None)
        if rotary is not None:
            kwargs["position_embeddings"] = rotary(x, pos)
        times = []
        with torch.inference_mode():
            for r in range(args.reps + 1):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                layer(x, **kwargs)
                torch.cuda.synchronize()
                if r > 0:
                    times.append(time.perf_counter() - t0)
        times.sort()
        timings.append({"label": label, "tokens": t, "seconds": times[len(times) // 2]})
        del x, mask

    report = {
        "device": f"{torch.cuda.get_device_name(0)} (HF transformers FalconDecoderLayer, bf16, sdpa)",
        "backend": "hf-transformers",
        "model": args.synthetic,
        "layer_bytes": layer_bytes,
        "layer_seconds": [[t["tokens"], t["seconds"]] for t in timings],
        "timings": timings,
        "h2d_seconds_per_layer": None,
        "h2d_bytes_per_s": None,
        "stream": None,
    }
    print(f"device: {report['device']}   model: {args.synthetic} (synthetic)   layer: {layer_bytes / 1e6:.1f} MB")
    print(f"{'batch':>10} {'tokens':>8} {'ms / layer':>14} {'tokens / s':>14}")
    for t in timings:
        print(f"{t['label']:>10} {t['tokens']:>8} {t['seconds'] * 1e3:>14.3f} {t['tokens'] / t['seconds']:>14.0f}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
