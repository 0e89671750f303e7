#!/usr/bin/env bash
# Everything falcon-batch needs a GPU for, in one call that ends well inside 8 minutes, on a
# machine without cargo: it runs binaries built and stripped here by `make gpu-check-build`
# (.gpu-carry/: falcon-batch, the cuda_parity test binary, the SmolLM2 slice) and writes
# every figure with pass/fail to $OUT/gpu-report.md (docs/PERFORMANCE.md, "GPU").
#
#   make gpu-check-build                         # here, where cargo is
#   scripts/gpu-check.sh                         # there (device tool: carry .gpu-carry)
#   GPU_CHECK_DEVICE=cpu scripts/gpu-check.sh    # rehearsal of every step on the CPU
#
# Steps (each under its own timeout, all under GPU_CHECK_BUDGET_S, default 450 s):
#   0. the CUDA backend opens (else: report "no CUDA device", exit 2, nothing else runs)
#   1. CUDA vs CPU parity: every op (flash attention on packed token trees, GQA groups up
#      to 29, past 65535 rows; linear_residual; the cuBLASLt plan cache), every fixture and
#      the SmolLM2 slice through the streaming window (per-token log-prob within 0.05,
#      same best choice where the CPU margin is over 0.1 nats)
#   2. mpirun -np 2 on one GPU (one layer group each, 1 slot) equals one CPU process
#   3. falcon-batch bench --synthetic falcon-180b: layers at T=100/512/2048/4x2048, the
#      attention op alone at the same shapes (TFLOP/s), decode,
#      one layer's pinned copy vs the one-tensor pinned ceiling, 16 layers streamed through
#      a window of 4 vs all resident; beside it scripts/bench_hf_falcon_layer.py (HF
#      transformers' FalconDecoderLayer) on the same shapes
# Exit: 0 all pass, 1 some check failed, 2 no CUDA device.
set -u -o pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
OUT=${OUT:-$ROOT/results/gpu-check}
mkdir -p "$OUT"
REPORT=$OUT/gpu-report.md
LOG=$OUT/gpu-check.log
: >"$LOG"
DEVICE=${GPU_CHECK_DEVICE:-cuda}
BUDGET=${GPU_CHECK_BUDGET_S:-450}
PRESET=falcon-180b
[ "$DEVICE" = cpu ] && PRESET=tiny
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 HDF5_USE_FILE_LOCKING=FALSE
PY=${GPU_CHECK_PYTHON:-$(command -v python3 || true)}

say() { echo "$*" >>"$REPORT"; }
note() { echo "[gpu-check $(date -u +%H:%M:%S) ${SECONDS}s] $*" | tee -a "$LOG" >&2; }
verdict() { # name ok|fail|skip detail
    local mark=PASS
    case $2 in fail) mark=FAIL ;; skip) mark=SKIP ;; esac
    say "| $1 | **$mark** | $3 |"
}
# Seconds a step may take: its own limit, cut to what the budget has left (10 s margin).
limit() {
    local left=$((BUDGET - SECONDS - 10))
    [ "$left" -lt "$1" ] && echo $((left > 5 ? left : 5)) || echo "$1"
}
# The newest executable matching a glob, first in .gpu-carry, then in target/release.
find_bin() {
    local f found
    # shellcheck disable=SC2086  # $2 is a glob on purpose
    mapfile -t found < <(ls -t target/release/$2 2>/dev/null)
    for f in ".gpu-carry/$1" "${found[@]}"; do
        if [ -x "$f" ] && [ -f "$f" ] && [[ $f != *.d ]]; then echo "$f"; return 0; fi
    done
    return 1
}

BIN=$(find_bin falcon-batch falcon-batch) || { echo "no falcon-batch binary: run 'make gpu-check-build' where cargo is, and carry .gpu-carry" >&2; exit 1; }
PARITY=$(find_bin cuda_parity 'deps/cuda_parity-*') || PARITY=
SMOL=
for f in .gpu-carry/smollm2-slice.gguf models/SmolLM2-135M-Instruct.Q4_1.gguf; do
    if [ -f "$f" ]; then SMOL=$f; break; fi
done

{
    echo "# falcon-batch GPU check"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), device \`$DEVICE\`, binary \`$BIN\`, commit \`$(git rev-parse --short HEAD 2>/dev/null || echo unknown)\`"
    echo
    echo '```'
    if [ "$DEVICE" = cuda ]; then timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || echo "nvidia-smi: not available"; fi
    echo "cpus: $(nproc), host memory: $(awk '/MemTotal/ {printf "%.0f GB", $2 / 1e6}' /proc/meminfo)"
    echo '```'
    echo
    echo "| check | result | figures |"
    echo "|---|---|---|"
} >"$REPORT"

# ---- 0. the backend opens ----
note "step 0: opening the $DEVICE backend"
if ! timeout "$(limit 90)" "$BIN" bench --device "$DEVICE" --synthetic tiny --layers 4 --window 2 --reps 1 --out "$WORK/smoke.json" >"$WORK/smoke.log" 2>&1; then
    cat "$WORK/smoke.log" >>"$LOG"
    why=$(grep -m1 -iE "unavailable|not found|error" "$WORK/smoke.log" || tail -1 "$WORK/smoke.log")
    verdict "backend opens" fail "no CUDA device: ${why//|/\\|}"
    say
    say "Stopped: no usable CUDA device, so no GPU figure could be taken."
    cat "$REPORT"
    exit 2
fi
cat "$WORK/smoke.log" >>"$LOG"
verdict "backend opens" ok "$(head -1 "$WORK/smoke.log")"

# ---- 1. parity ----
note "step 1: CUDA vs CPU parity"
if [ -z "$PARITY" ]; then
    verdict "parity" fail "no cuda_parity test binary (make gpu-check-build)"
elif [ "$DEVICE" = cpu ]; then
    verdict "parity" skip "rehearsal on the CPU: the CUDA half needs a GPU"
else
    # The test reads tests/fixtures under FALCON_BATCH_ROOT, SmolLM2 from FALCON_BATCH_SMOLLM2.
    FALCON_BATCH_ROOT=$ROOT FALCON_BATCH_SMOLLM2=${SMOL:-/nonexistent} timeout "$(limit 180)" "$PARITY" --nocapture --test-threads=1 >"$WORK/parity.log" 2>&1
    rc=$?
    cat "$WORK/parity.log" >>"$LOG"
    summary=$(grep -m1 "^test result" "$WORK/parity.log" || echo "no result (rc $rc)")
    if [ "$rc" -eq 0 ]; then
        verdict "CUDA op and model parity (cuda_parity)" ok "$summary"
    else
        verdict "CUDA op and model parity (cuda_parity)" fail "rc $rc: $summary; failing: $(grep -E '^test .* FAILED' "$WORK/parity.log" | tr '\n' ' ')"
    fi
    grep "^PARITY" "$WORK/parity.log" | while read -r _ name res rest; do
        echo "| parity $name | $res | ${rest//|/\\|} |" >>"$REPORT"
    done
    grep -q "skipped: no CUDA device" "$WORK/parity.log" && verdict "parity ran on the GPU" fail "the test binary found no CUDA device"
    [ -z "$SMOL" ] && verdict "parity smollm2" skip "no SmolLM2 slice carried (.gpu-carry/smollm2-slice.gguf)"
fi

# ---- 2. mpirun -np 2 on one GPU vs one CPU process ----
note "step 2: mpirun -np 2 vs the CPU"
fixture_corpus() { # a corpus over llama_tied's word vocabulary ("t3" ... "t92")
    local i k c
    for i in $(seq 0 23); do
        printf '{"id": "d%d", "prompt": "' "$i"
        for k in $(seq 0 $((5 + i % 11))); do printf 't%d ' $((3 + (i * 7 + k * 13) % 90)); done
        printf '", "choices": ['
        for c in 0 1 2; do
            [ "$c" -gt 0 ] && printf ', '
            printf '"t%d t%d"' $((3 + (i + c * 31) % 90)) $((3 + (i * 3 + c) % 90))
        done
        printf ']}\n'
    done
}
# One model: convert, score on one CPU process, score under mpirun -np 2 on $DEVICE with
# several groups per rank where the layers allow, compare the files.
mpi_check() { # label model-source corpus group-layers
    local label=$1 model=$WORK/mpi-$1 rc_cpu rc_mpi cmp
    if ! timeout "$(limit 90)" "$BIN" convert --from "$2" --to "$model" >>"$LOG" 2>&1; then
        verdict "mpirun -np 2 equals the CPU ($label)" fail "converting $2 failed (see gpu-check.log)"
        return
    fi
    local common=(score --model "$model" --docs "$3" --batch-tokens 600 --wave 3 --quiet)
    timeout "$(limit 90)" "$BIN" "${common[@]}" --device cpu --out "$WORK/$label-cpu.h5" >>"$LOG" 2>&1
    rc_cpu=$?
    timeout "$(limit 120)" mpirun --oversubscribe -np 2 "$BIN" "${common[@]}" --device "$DEVICE" --group-layers "$4" --resident 1 \
        --out "$WORK/$label-np2.h5" --trace "$OUT/np2-$label-trace.json" >>"$LOG" 2>&1
    rc_mpi=$?
    # 0: all scored; 3: some documents failed validation (the same ones on both sides).
    if [[ $rc_cpu != [03] || $rc_mpi != [03] || $rc_cpu != "$rc_mpi" ]]; then
        verdict "mpirun -np 2 equals the CPU ($label)" fail "exit codes: cpu $rc_cpu, mpirun $rc_mpi (see gpu-check.log)"
        return
    fi
    if [ -z "$PY" ] || ! "$PY" -c "import h5py" 2>/dev/null; then
        verdict "mpirun -np 2 equals the CPU ($label)" skip "both ran; no python3 with h5py to compare"
        return
    fi
    cmp=$("$PY" - "$WORK/$label-cpu.h5" "$WORK/$label-np2.h5" <<'EOF'
import sys, h5py, numpy as np
a, b = h5py.File(sys.argv[1], "r"), h5py.File(sys.argv[2], "r")
ida, idb = list(a["docs/id"][:]), list(b["docs/id"][:])
ok = ida == idb
pa, pb = a["choices/logprob_mean"][:], b["choices/logprob_mean"][:]
diff = float(np.max(np.abs(pa - pb))) if len(pa) == len(pb) and len(pa) else float("inf")
off, n, lp = a["docs/choice_offset"][:], a["docs/n_choices"][:], a["choices/logprob"][:]
checked = same = 0
for d in range(len(n)):
    if n[d] < 2:
        continue
    top = np.sort(lp[off[d]:off[d] + n[d]])[::-1]
    if top[0] - top[1] > 0.1:
        checked += 1
        same += int(a["docs/best"][d] == b["docs/best"][d])
ok = ok and diff <= 0.05 and same == checked
print(("ok" if ok else "fail") + f" docs={len(ida)} max_abs_mean_token_logprob_diff={diff:.5f} best_same={same}/{checked} (cpu margin > 0.1)")
EOF
)
    verdict "mpirun -np 2 ($DEVICE) equals the CPU ($label)" "${cmp%% *}" "${cmp#* }"
}
if ! command -v mpirun >/dev/null; then
    verdict "mpirun -np 2 equals the CPU" skip "mpirun not installed here"
else
    fixture_corpus >"$WORK/docs.jsonl"
    # 3 layers: one group per rank.
    mpi_check llama_tied tests/fixtures/llama_tied "$WORK/docs.jsonl" 2
    # 4 layers of real weights: two groups per rank through one slot (streamed).
    if [ -n "$SMOL" ]; then
        mpi_check smollm2-slice "$SMOL" inputs/sample.jsonl 1
    else
        verdict "mpirun -np 2 equals the CPU (smollm2)" skip "no SmolLM2 slice carried"
    fi
fi

# ---- 3. layer benchmark, copies, streaming; HF peer ----
note "step 3: bench --synthetic $PRESET"
if timeout "$(limit 240)" "$BIN" bench --device "$DEVICE" --synthetic "$PRESET" --layers 16 --window 4 --reps 3 --out "$OUT/bench-$PRESET.json" >"$WORK/bench.log" 2>&1; then
    bench_ok=1
else
    bench_ok=0
    verdict "bench $PRESET" fail "rc $? (see gpu-check.log): $(tail -1 "$WORK/bench.log")"
fi
cat "$WORK/bench.log" >>"$LOG"
hf_ok=0
if [ "$DEVICE" = cpu ]; then
    verdict "HF transformers peer" skip "rehearsal on the CPU"
elif [ -z "$PY" ]; then
    verdict "HF transformers peer" skip "no python3"
else
    note "step 3b: HF transformers FalconDecoderLayer"
    if timeout "$(limit 150)" "$PY" scripts/bench_hf_falcon_layer.py --synthetic "$PRESET" --out "$OUT/bench-hf-$PRESET.json" >"$WORK/hf.log" 2>&1; then
        hf_ok=1
    else
        verdict "HF transformers peer" fail "rc $? (see gpu-check.log): $(tail -1 "$WORK/hf.log")"
    fi
    cat "$WORK/hf.log" >>"$LOG"
fi
if [ "$bench_ok" = 1 ] && [ -n "$PY" ]; then
    hf_json=
    [ "$hf_ok" = 1 ] && hf_json=$OUT/bench-hf-$PRESET.json
    "$PY" - "$OUT/bench-$PRESET.json" "$hf_json" "$DEVICE" >>"$REPORT" <<'EOF'
import json, sys
fb = json.load(open(sys.argv[1]))
hf = json.load(open(sys.argv[2])) if sys.argv[2] else None
gpu = sys.argv[3] == "cuda"
def row(name, ok, detail):
    print(f"| {name} | **{'PASS' if ok else 'FAIL'}** | {detail} |" if ok is not None else f"| {name} | **SKIP** | {detail} |")
# Targets from docs/PERFORMANCE.md ("GPU"): 1.25x HF at T=2048, 1.4x at T=100, streaming at
# least 0.9 of resident throughput, a layer's copy at least 90% of the pinned ceiling.
targets = {"100": 1.4, "2048": 1.25}
hft = {t["label"]: t["seconds"] for t in hf["timings"]} if hf else {}
for t in fb["timings"]:
    peer = hft.get(t["label"])
    speed = f"{t['seconds'] * 1e3:.3f} ms per layer ({t['tokens'] / t['seconds']:.0f} tokens/s)"
    if peer:
        ratio = peer / t["seconds"]
        want = targets.get(t["label"])
        row(f"layer T={t['label']} vs HF", (ratio >= want) if (want and gpu) else None,
            f"{speed}; HF {peer * 1e3:.3f} ms; {ratio:.2f}x HF" + (f" (target {want}x)" if want else ""))
    else:
        row(f"layer T={t['label']}", None, speed + "; no HF figure")
for a in fb.get("attention", []):
    row(f"attention alone T={a['label']}", None, f"{a['seconds'] * 1e3:.3f} ms, {a['tflops']:.3g} TFLOP/s on the attended (query, key) pairs (bf16 mma; H100/H200 dense bf16 peak ~990)")
for d in fb.get("decode", []):
    row(f"decode step at context {d['context']}", None, f"{d['seconds'] * 1e3:.3f} ms per layer")
bw, peak, secs = fb.get("h2d_bytes_per_s"), fb.get("h2d_peak_bytes_per_s"), fb.get("h2d_seconds_per_layer")
if bw and peak:
    row("one layer's pinned copy vs the pinned ceiling", (bw >= 0.9 * peak) if gpu else None,
        f"{secs * 1e3:.1f} ms per layer ({fb['layer_bytes'] / 1e9:.2f} GB), {bw / 1e9:.1f} GB/s vs one-tensor ceiling {peak / 1e9:.1f} GB/s = {100 * bw / peak:.0f}% (target 90%)")
else:
    row("pinned copies", None, "not measured on this backend")
s = fb.get("stream")
if s:
    row(f"stream {s['layers']} layers through {s['window']} resident", (s["relative_throughput"] >= 0.9) if gpu else None,
        f"{s['seconds']:.3f} s vs {s['resident_seconds']:.3f} s all resident at {s['tokens']} tokens: {s['relative_throughput']:.2f} of resident throughput (target 0.9)")
else:
    row("streaming", None, "not measured on this backend")
EOF
fi

{
    echo
    echo "Ran in ${SECONDS} s (budget ${BUDGET} s). Logs: gpu-check.log; JSON: bench-$PRESET.json$( [ "$hf_ok" = 1 ] && echo ", bench-hf-$PRESET.json"); traces of the mpirun runs: np2-*-trace.rank{0,1}.json."
    echo
    echo '```'
    grep -vE "^\s*$" "$WORK/bench.log" 2>/dev/null | tail -20
    [ -f "$WORK/hf.log" ] && grep -vE "^\s*$" "$WORK/hf.log" | tail -8
    echo '```'
} >>"$REPORT"
cat "$REPORT"
FAILS=$(grep -c '| \*\*FAIL\*\* |' "$REPORT")
if [ "$FAILS" -eq 0 ]; then exit 0; fi
echo "gpu-check: $FAILS checks failed" >&2
exit 1
