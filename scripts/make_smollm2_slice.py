#!/usr/bin/env python3
"""Write the first N blocks of a llama-family GGUF as a smaller GGUF (metadata and
tokenizer unchanged except llama.block_count; tensors copied byte for byte, quantized or
not). scripts/gpu-check.sh checks CUDA against the CPU on SmolLM2's real weights this way:
the whole 94 MiB Q4_1 file does not fit the 64 MiB a device call may carry.

    python3 scripts/make_smollm2_slice.py models/SmolLM2-135M-Instruct.Q4_1.gguf .gpu-carry/smollm2-slice.gguf --blocks 4

Needs the `gguf` package (llama.cpp's reader).
"""
import argparse
import re
import struct
import sys


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--blocks", type=int, default=4)
    a = ap.parse_args()
    try:
        from gguf import GGUFReader
    except ImportError as e:
        print(f"make_smollm2_slice: needs the gguf package ({e})", file=sys.stderr)
        return 2
    r = GGUFReader(a.src)
    arch = bytes(r.fields["general.architecture"].parts[-1]).decode()
    count_key = f"{arch}.block_count"
    if count_key not in r.fields:
        print(f"{a.src}: no {count_key} field", file=sys.stderr)
        return 1
    n_blocks = int(r.fields[count_key].parts[-1][0])
    if not 0 < a.blocks <= n_blocks:
        print(f"{a.src}: --blocks {a.blocks} outside 1..{n_blocks}", file=sys.stderr)
        return 1
    align = int(r.fields["general.alignment"].parts[-1][0]) if "general.alignment" in r.fields else 32

    def kept(name):
        m = re.match(r"blk\.(\d+)\.", name)
        return m is None or int(m.group(1)) < a.blocks

    tensors = [t for t in r.tensors if kept(t.name)]
    out = bytearray()
    out += b"GGUF" + struct.pack("<I", 3)
    out += struct.pack("<QQ", len(tensors), len(r.fields) - 3)  # without the header's own fields
    for key, f in r.fields.items():
        if key.startswith("GGUF."):
            continue
        parts = [bytes(p) for p in f.parts]
        if key == count_key:
            parts[-1] = struct.pack("<" + {4: "I", 8: "Q"}[len(parts[-1])], a.blocks)
        out += b"".join(parts)
    offset = 0
    offsets = []
    for t in tensors:
        name = t.name.encode()
        dims = [int(d) for d in t.shape]  # GGUF order (fastest first), as stored
        out += struct.pack("<Q", len(name)) + name + struct.pack("<I", len(dims))
        out += b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", int(t.tensor_type), offset)
        offsets.append(offset)
        offset += (int(t.n_bytes) + align - 1) // align * align
    out += b"\0" * ((-len(out)) % align)
    with open(a.dst, "wb") as f:
        f.write(out)
        for t, off in zip(tensors, offsets):
            data = bytes(t.data.tobytes())
            if len(data) != int(t.n_bytes):
                print(f"{t.name}: {len(data)} data bytes, header says {t.n_bytes}", file=sys.stderr)
                return 1
            f.write(data + b"\0" * ((-len(data)) % align))
    print(f"wrote {a.dst}: {len(tensors)} of {len(r.tensors)} tensors, {a.blocks} of {n_blocks} blocks, {len(out) + offset} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
