#!/usr/bin/env bash
# Copy to node-local disk only the model parts the ranks on this node run, plus the
# manifest and tokenizer, so a node never reads the whole 360 GB model.
#
#   stage-parts.sh --model SRC --dest DIR --ranks N --first-rank F --local-ranks G [-- PLAN FLAGS]
#
# The plan flags (--device-mem, --resident, --group-layers, ...) must be the ones `score`
# runs with, or the ranks will look for parts that were not staged. Files already staged
# with the right size are kept, so a resubmitted job starts quickly.
# FALCON_BATCH names the binary (default: falcon-batch on PATH).
set -euo pipefail

usage() {
    echo "usage: $0 --model SRC --dest DIR --ranks N --first-rank F --local-ranks G [-- PLAN FLAGS]" >&2
    exit 2
}

model="" dest="" ranks="" first="" local_ranks=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --model) model="${2:-}"; shift 2 ;;
        --dest) dest="${2:-}"; shift 2 ;;
        --ranks) ranks="${2:-}"; shift 2 ;;
        --first-rank) first="${2:-}"; shift 2 ;;
        --local-ranks) local_ranks="${2:-}"; shift 2 ;;
        --) shift; break ;;
        *) usage ;;
    esac
done
[[ -n "$model" && -n "$dest" && -n "$ranks" && -n "$first" && -n "$local_ranks" ]] || usage
bin="${FALCON_BATCH:-falcon-batch}"
[[ -f "$model/manifest.json" ]] || { echo "$model/manifest.json: not found" >&2; exit 1; }

mkdir -p "$dest"
files=(manifest.json)
[[ -f "$model/tokenizer.json" ]] && files+=(tokenizer.json)
last=$((first + local_ranks - 1))
if (( last >= ranks )); then
    last=$((ranks - 1))
fi
for ((r = first; r <= last; r++)); do
    # A command substitution, not a process substitution: a failing plan stops the staging.
    listed=$("$bin" plan --model "$model" --ranks "$ranks" --parts-for-rank "$r" "$@") \
        || { echo "stage-parts: \`falcon-batch plan ... --parts-for-rank $r\` failed (PLAN_FLAGS must be plan flags)" >&2; exit 1; }
    while IFS= read -r part; do
        [[ -n "$part" ]] && files+=("$part")
    done <<< "$listed"
done

# Ranks on one node may share parts (begin/end, or a small model); copy each once.
mapfile -t unique < <(printf '%s\n' "${files[@]}" | sort -u)
for f in "${unique[@]}"; do
    src="$model/$f"
    dst="$dest/$f"
    [[ -f "$src" ]] || { echo "$src: part missing from the model directory" >&2; exit 1; }
    if [[ -f "$dst" && "$(stat -c %s "$src")" == "$(stat -c %s "$dst")" ]]; then
        continue
    fi
    # Copy under a temporary name so an interrupted copy never looks staged.
    cp "$src" "$dst.partial"
    mv "$dst.partial" "$dst"
done
echo "staged ${#unique[@]} files for ranks $first-$last into $dest"
