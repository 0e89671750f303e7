#!/usr/bin/env python3
"""The pipeline over a real (shaped) network, against the planner's prediction.

On N test hosts (network namespaces on a bridge, each host's egress shaped with tc tbf by
scripts/testhosts.sh), one rank per host, score a corpus with:
  plan      the planner's schedule (its wave, 4 per rank) with f32 activations on the wire
  wave1     the seed's way: one micro-batch per wave (--wave 1), f32 wire
  bf16      the planner's schedule with --wire-dtype bf16
Each is repeated (interleaved, so drifting load hits all alike) and the fastest kept: the
machine is shared, so the minimum is the least disturbed run. For each run: documents/hour
from the job's own timer (scoring only; start-up is not in it), bytes on the links from the
hosts' interface counters (tx_bytes of every host's eth0, less an empty-corpus run's), and
the 1-minute load average. `falcon-batch plan`, given the `bench` layer costs and the link's
rate and latency, predicts each configuration.

    python3 scripts/net_bench.py --hosts 2 [--rate 20mbit] [--repeats 2] [--copies 2]

Needs root (namespaces). Hosts are prefixed fbg- on 10.214.0.0/24 and removed at the end.
"""
import argparse, json, os, re, subprocess, sys, time

p = argparse.ArgumentParser()
p.add_argument("--bin", default="target/release/falcon-batch")
p.add_argument("--model", default="models/smollm2-135m")
p.add_argument("--docs", default="inputs/sample.jsonl")
p.add_argument("--copies", type=int, default=2, help="corpus = this many copies of --docs (ids made unique)")
p.add_argument("--hosts", type=int, default=2)
p.add_argument("--rate", default=None, help="link rate per host (tc tbf), e.g. 20mbit; default: a micro-batch hop ~ a group's compute")
p.add_argument("--latency", type=float, default=1e-4, help="link latency given to the planner, seconds")
p.add_argument("--batch-tokens", default="512")
p.add_argument("--device-mem", default="8GB")
p.add_argument("--repeats", type=int, default=2)
p.add_argument("--configs", default="plan,wave1,bf16")
p.add_argument("--wave1-repeats", type=int, default=None, help="repeats of the (slow) --wave 1 runs [default: --repeats]")
p.add_argument("--out", default="results/net")
p.add_argument("--testhosts", default="scripts/testhosts.sh")
p.add_argument("--hop", action="store_true",
               help="instead: time large hops (f32, --hop-tokens per micro-batch) with the MPI progress thread on and off")
p.add_argument("--hop-tokens", default="1024")
p.add_argument("--hop-docs", type=int, default=10, help="the first this many documents of --docs")
a = p.parse_args()
os.makedirs(a.out, exist_ok=True)
BIN, MODEL = os.path.abspath(a.bin), os.path.abspath(a.model)
env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", HDF5_USE_FILE_LOCKING="FALSE",
           FB_HOSTS_PREFIX="fbg", FB_HOSTS_SUBNET="10.214.0", RAYON_NUM_THREADS="1")
N = a.hosts

def sh(cmd, **kw):
    return subprocess.run(cmd, env=env, text=True, capture_output=True, **kw)

# The corpus: copies of the sample with unique ids, so the run is long enough to time.
corpus = os.path.abspath(os.path.join(a.out, f"corpus-x{a.copies}.jsonl"))
lines = [json.loads(l) for l in open(a.docs) if l.strip()]
with open(corpus, "w") as f:
    for k in range(a.copies):
        for d in lines:
            f.write(json.dumps(dict(d, id=f"{d.get('id', 'doc')}-{k}")) + "\n")
empty = os.path.abspath(os.path.join(a.out, "empty.jsonl"))
open(empty, "w").close()

# Layer costs of this machine; one thread per rank, and N ranks share the cores.
bench = os.path.join(a.out, "bench.json")
if not os.path.exists(bench) and not a.hop:
    subprocess.run([BIN, "bench", "--device", "cpu", "--synthetic", "smollm2-135m", "--reps", "2", "--out", bench],
                   check=True, env=env, stdout=subprocess.DEVNULL)
costs = json.load(open(bench)) if not a.hop else {"layer_seconds": []}
cores = os.cpu_count() or 1
share = max(1.0, N / cores)
costs["layer_seconds"] = [[t, s * share] for t, s in costs["layer_seconds"]]
costs["h2d_bytes_per_s"] = 5e9   # "upload" on the CPU backend is an f32 copy

def bench_layer_s(tokens):
    """The bench's seconds per layer at `tokens`, interpolated as the planner does."""
    pts = costs["layer_seconds"]
    i = min(max(next((k for k, (t, _) in enumerate(pts) if t >= tokens), len(pts) - 1), 1), len(pts) - 1)
    (x0, y0), (x1, y1) = pts[i - 1], pts[i]
    return y0 + (y1 - y0) * (tokens - x0) / (x1 - x0)

def slowdown(trace, flags):
    """How much slower the run's own compute was than the bench says (the machine is shared):
    the sum of its compute spans over the bench's cost of the same layers and tokens."""
    if not os.path.exists(trace):
        return None
    k = int(flags[flags.index("--group-layers") + 1])
    spans = [e for e in json.load(open(trace))["traceEvents"] if e.get("ph") == "X" and e.get("cat") == "compute"]
    real = sum(e["dur"] / 1e6 for e in spans)
    model = sum(k * bench_layer_s(e["args"]["tokens"]) for e in spans)
    return real / model if model > 0 else None

def plan(extra, rate_bytes, scale=1.0):
    c = dict(costs, net_bytes_per_s=rate_bytes, net_latency_s=a.latency)
    c["layer_seconds"] = [[t, s * scale] for t, s in costs["layer_seconds"]]
    path = os.path.join(a.out, "costs.json")
    json.dump(c, open(path, "w"))
    r = sh([BIN, "plan", "--model", MODEL, "--ranks", str(N), "--device-mem", a.device_mem, "--costs", path,
            "--batch-tokens", a.batch_tokens] + extra)
    if r.returncode != 0:
        sys.exit(f"plan failed: {r.stderr}")
    return r.stdout

def corpus_shape(h5):
    def dump(path):
        txt = sh(["h5dump", "-d", path, "-y", "-w", "0", h5]).stdout
        body = txt[txt.index("DATA {") + 6: txt.rindex("}")]
        return [int(x) for x in body.replace("}", "").split(",") if x.strip()]
    prompt, n_choices, ctoks = dump("/docs/n_prompt_tokens"), dump("/docs/n_choices"), dump("/choices/n_tokens")
    return len(prompt), round(sum(prompt) / len(prompt)), round(sum(n_choices) / len(prompt)), round(sum(ctoks) / len(ctoks))

def reshape(hosts, rate):
    """testhosts.sh gives tbf a 1 MB bucket (right for 1gbit); at a few Mbit/s that bucket
    would let a whole micro-batch through at line rate after each pause, so shrink it."""
    for h in hosts:
        r = sh(["ip", "netns", "exec", h, "tc", "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", rate,
                "burst", "16kb", "latency", "400ms"])
        if r.returncode != 0:
            sys.exit(f"tc on {h}: {r.stderr}")

def hop_mode():
    """Large hops with and without the progress thread (FALCON_BATCH_PROGRESS_US=0). A hop's
    time runs from when both sides have posted (rank 0 its send, rank 1 its receive) to the
    end of rank 1's wait for it, with the share of it rank 0 spent computing (no MPI call of
    its own); clocks share the start barrier."""
    rate = a.rate or "50mbit"
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(k|m|g)bit", rate)
    rate_bytes = float(m.group(1)) * {"k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)] / 8
    th = os.path.abspath(a.testhosts)
    up = sh([th, "up", "2", rate])
    if up.returncode != 0:
        sys.exit(f"testhosts up failed: {up.stderr}")
    rows = []
    docs = os.path.abspath(os.path.join(a.out, "hop-docs.jsonl"))
    with open(docs, "w") as f:
        f.writelines([l for l in open(a.docs) if l.strip()][:a.hop_docs])
    try:
        mpi_args = sh([th, "mpirun-args"]).stdout.split()
        hosts = [l.split()[0] for l in sh([th, "hosts"]).stdout.splitlines()]
        reshape(hosts, rate)
        h1 = hosts[0]
        for rep in range(a.repeats):
            for us in ("0", "500"):
                trace = os.path.abspath(os.path.join(a.out, f"hop-{us}-{rep}.json"))
                cmd = ["ip", "netns", "exec", h1, "mpirun"] + mpi_args + ["--map-by", "ppr:1:node", "-np", "2"]
                for k in ("OMPI_ALLOW_RUN_AS_ROOT", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "HDF5_USE_FILE_LOCKING", "RAYON_NUM_THREADS"):
                    cmd += ["-x", k]
                cmd += ["-x", f"FALCON_BATCH_PROGRESS_US={us}", BIN, "score", "--device", "cpu", "--model", MODEL, "--docs",
                        docs, "--out", os.path.abspath(os.path.join(a.out, "hop.h5")), "--overwrite", "--quiet",
                        "--device-mem", a.device_mem, "--batch-tokens", a.hop_tokens, "--group-layers", "15", "--resident", "1",
                        "--wave", "1", "--wire-dtype", "f32", "--trace", trace]
                load = os.getloadavg()[0]
                r = sh(cmd)
                if r.returncode not in (0, 3):
                    sys.exit(f"hop run failed: {r.stderr[-2000:]}")
                ev = [e for e in json.load(open(trace))["traceEvents"] if e.get("ph") == "X"]
                sends = sorted((e for e in ev if e["pid"] == 0 and e["cat"] == "send"), key=lambda e: e["ts"])
                recvs = sorted((e for e in ev if e["pid"] == 1 and e["cat"] == "receive"), key=lambda e: e["ts"])
                computes = [e for e in ev if e["pid"] == 0 and e["cat"] == "compute"]
                for i, (snd, rcv) in enumerate(zip(sends, recvs)):
                    # The bytes can move once both sides have posted; the hop ends when they are in.
                    start, end = max(snd["ts"], rcv["ts"]), rcv["ts"] + rcv["dur"]
                    busy = sum(max(0, min(end, c["ts"] + c["dur"]) - max(start, c["ts"])) for c in computes)
                    hop_s, ideal = (end - start) / 1e6, rcv["args"]["bytes"] / rate_bytes
                    share = busy / max(end - start, 1)
                    rows.append({"progress_us": us, "rep": rep, "hop": i, "bytes": rcv["args"]["bytes"], "seconds": hop_s,
                                 "link_seconds": ideal, "sender_computing": share, "load": load})
                    print(f"  progress {us} us, rep {rep}, hop {i}: {rcv['args']['bytes'] / 1e6:.1f} MB in {hop_s:.2f} s "
                          f"(link alone {ideal:.2f} s), sender computing {100 * share:.0f}% of it, load {load:.1f}", flush=True)
    finally:
        sh([th, "down"])
    json.dump(rows, open(os.path.join(a.out, "hops.json"), "w"))
    sys.exit(0)

if a.hop:
    hop_mode()

# The link rate: a micro-batch's hop should cost about what computing a group does, for the
# group size the planner picks on that link. Start from a fast link and iterate to a fixed
# point (group size -> rate -> the planner's group size at that rate).
def parse_rate(rate):
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(k|m|g)bit", rate)
    return float(m.group(1)) * {"k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)] / 8

shape = ["--docs", "52", "--doc-tokens", "180", "--choices", "4", "--choice-tokens", "3", "--wire-dtype", "f32"]
tokens = int(a.batch_tokens)
pts = costs["layer_seconds"]
layer_s = next((s for t, s in pts if t >= tokens), pts[-1][1])
hop_bits = 8 * 4 * tokens * 576
rate = a.rate or "1gbit"
for _ in range(4):
    flags_line = re.search(r"flags for this plan: (.*)", plan(shape, parse_rate(rate))).group(1)
    group_layers = int(re.search(r"--group-layers (\d+)", flags_line).group(1))
    if a.rate:
        break
    balanced = f"{max(1, round(hop_bits / (layer_s * group_layers) / 1e6))}mbit"
    if balanced == rate:
        break
    rate = balanced
rate_bytes = parse_rate(rate)
group_s = layer_s * group_layers
print(f"{N} hosts at {rate}: chosen plan {flags_line}; a group of {group_layers} layers at {tokens} tokens ~ {group_s:.2f} s, "
      f"a {hop_bits / 8e6:.2f} MB f32 hop ~ {hop_bits / 8 / rate_bytes:.2f} s", flush=True)

th = os.path.abspath(a.testhosts)
up = sh([th, "up", str(N), rate])
if up.returncode != 0:
    sys.exit(f"testhosts up failed: {up.stderr}")
results = []
try:
    mpi_args = sh([th, "mpirun-args"]).stdout.split()
    hosts = [l.split()[0] for l in sh([th, "hosts"]).stdout.splitlines()]
    reshape(hosts, rate)

    def tx_bytes():
        return sum(int(sh(["ip", "netns", "exec", h, "cat", "/sys/class/net/eth0/statistics/tx_bytes"]).stdout) for h in hosts)

    def score(docs, flags, tag):
        out = os.path.abspath(os.path.join(a.out, f"{tag}.h5"))
        cmd = ["ip", "netns", "exec", hosts[0], "mpirun"] + mpi_args + ["--map-by", "ppr:1:node", "-np", str(N)]
        for k in ("OMPI_ALLOW_RUN_AS_ROOT", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "HDF5_USE_FILE_LOCKING", "RAYON_NUM_THREADS"):
            cmd += ["-x", k]
        trace = out[:-3] + ".trace.json"
        cmd += [BIN, "score", "--device", "cpu", "--model", MODEL, "--docs", docs, "--out", out, "--overwrite",
                "--device-mem", a.device_mem, "--batch-tokens", a.batch_tokens, "--trace", trace] + flags
        load = os.getloadavg()[0]
        before = tx_bytes()
        r = sh(cmd)
        sent = tx_bytes() - before
        if r.returncode not in (0, 3):
            sys.exit(f"score failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-3000:]}")
        m = re.search(r"this run added (\d+) \(\d+ resumed\) in ([\d.]+) s", r.stderr)
        added, secs = (int(m.group(1)), float(m.group(2))) if m else (0, 0.0)
        return {"docs": added, "seconds": secs, "bytes": sent, "load": load, "h5": out, "slowdown": slowdown(trace, flags)}

    # The plan's --resident, --group-layers and --wave; batch tokens and wire dtype are set here.
    chosen = re.findall(r"(--resident|--group-layers|--wave) (\d+)", flags_line)
    base = {k: v for k, v in chosen}
    def flags(**over):
        d = dict(base, **{"--" + k.replace("_", "-"): str(v) for k, v in over.items()})
        return [x for kv in d.items() for x in kv]
    configs = {"plan": flags(wire_dtype="f32"), "wave1": flags(wave=1, wire_dtype="f32"), "bf16": flags(wire_dtype="bf16")}
    names = [c for c in a.configs.split(",") if c in configs]
    empty_run = score(empty, configs["plan"], "empty")
    runs = {c: [] for c in names}
    for rep in range(a.repeats):
        for c in names:
            if c == "wave1" and rep >= (a.wave1_repeats if a.wave1_repeats is not None else a.repeats):
                continue
            r = score(corpus, configs[c], f"{c}-{rep}")
            runs[c].append(r)
            print(f"  {c} rep {rep}: {r['docs']} docs in {r['seconds']:.1f} s = {3600 * r['docs'] / max(r['seconds'], 1e-9):.0f}/h, "
                  f"{(r['bytes'] - empty_run['bytes']) / max(r['docs'], 1) / 1e6:.2f} MB/doc on the links, load {r['load']:.1f}", flush=True)
    docs, doc_tokens, choices, ctoks = corpus_shape(runs[names[0]][0]["h5"])
    for c in names:
        best = min(runs[c], key=lambda r: r["seconds"])
        rep = json.loads(plan(configs[c] + ["--docs", str(docs), "--doc-tokens", str(doc_tokens), "--choices", str(choices),
                                            "--choice-tokens", str(ctoks), "--json"], rate_bytes))["report"]
        measured = 3600 * best["docs"] / best["seconds"]
        # The same plan with the bench's costs scaled by this run's own compute slowdown: what
        # the simulator's pipeline and network model get right once compute is priced right.
        sd = best["slowdown"] or 1.0
        cal = json.loads(plan(configs[c] + ["--docs", str(docs), "--doc-tokens", str(doc_tokens), "--choices", str(choices),
                                            "--choice-tokens", str(ctoks), "--json"], rate_bytes, sd))["report"]
        results.append({
            "config": c, "hosts": N, "rate": rate, "flags": " ".join(configs[c]),
            "docs_per_hour": measured, "seconds": best["seconds"], "load": best["load"],
            "loads": [r["load"] for r in runs[c]], "all_seconds": [r["seconds"] for r in runs[c]],
            "bytes_per_doc": (best["bytes"] - empty_run["bytes"]) / max(best["docs"], 1),
            "predicted_docs_per_hour": rep["docs_per_hour"], "predicted_bytes_per_doc": rep["net_bytes_per_doc"],
            "ratio": rep["docs_per_hour"] / measured,
            "slowdown": sd, "calibrated_docs_per_hour": cal["docs_per_hour"], "calibrated_ratio": cal["docs_per_hour"] / measured,
        })
finally:
    sh([th, "down"])

print(f"\n| hosts | config | flags | docs/hour (best of {a.repeats}) | predicted (bench costs) | pred/meas | compute slowdown vs bench | predicted (bench x slowdown) | pred/meas | MB/doc on links | load (1 min) |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for r in results:
    print(f"| {r['hosts']} @ {r['rate']} | {r['config']} | `{r['flags']}` | {r['docs_per_hour']:.0f} | {r['predicted_docs_per_hour']:.0f} | "
          f"{r['ratio']:.2f} | {r['slowdown']:.2f} | {r['calibrated_docs_per_hour']:.0f} | {r['calibrated_ratio']:.2f} | "
          f"{r['bytes_per_doc'] / 1e6:.2f} | {', '.join(f'{l:.1f}' for l in r['loads'])} |")
json.dump(results, open(os.path.join(a.out, f"net-{N}hosts.json"), "w"), indent=1)
