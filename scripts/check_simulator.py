#!/usr/bin/env python3
"""Checks the planner's simulator against a real run on this machine.

1. `falcon-batch bench` measures per-layer costs of the model's shape on the CPU.
2. `falcon-batch plan --costs` predicts the wall time of scoring the corpus on N ranks.
3. `mpirun -np N falcon-batch score` runs it for real with the same schedule flags.
Prints both times and the ratio. Ranks beyond the machine's cores share them, so the
measured per-layer costs are scaled by ranks / cores when oversubscribed (the simulator
treats each rank as its own device).

    python3 scripts/check_simulator.py [--bin target/release/falcon-batch] [--ranks 3]
"""
import argparse, json, os, subprocess, sys, time

p = argparse.ArgumentParser()
p.add_argument("--bin", default="target/release/falcon-batch")
p.add_argument("--model", default="models/smollm2-135m")
p.add_argument("--docs", default="inputs/sample.jsonl")
p.add_argument("--ranks", type=int, default=3)
p.add_argument("--group-layers", default="5")
p.add_argument("--resident", default="1")
p.add_argument("--wave", default="3")
p.add_argument("--batch-tokens", default="512")
p.add_argument("--out", default="results")
a = p.parse_args()
os.makedirs(a.out, exist_ok=True)
env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", HDF5_USE_FILE_LOCKING="FALSE")
cores = os.cpu_count() or 1
threads = max(1, cores // a.ranks)
env["RAYON_NUM_THREADS"] = str(threads)

bench_json = os.path.join(a.out, "simcheck-bench.json")
subprocess.run([a.bin, "bench", "--device", "cpu", "--synthetic", "smollm2-135m", "--reps", "2", "--out", bench_json],
               check=True, env=env, stdout=subprocess.DEVNULL)
costs = json.load(open(bench_json))
share = max(1.0, a.ranks * threads / cores)
costs["layer_seconds"] = [[t, s * share] for t, s in costs["layer_seconds"]]
costs.setdefault("net_bytes_per_s", 5e9)   # MPI over shared memory on one machine
costs.setdefault("net_latency_s", 2e-5)
costs.setdefault("h2d_bytes_per_s", 5e9)   # "upload" on the CPU backend is an f32 copy
costs_json = os.path.join(a.out, "simcheck-costs.json")
json.dump(costs, open(costs_json, "w"))

# The corpus shape: measured from the real run's output below, so do the run first.
out_h5 = os.path.join(a.out, "simcheck.h5")
flags = ["--group-layers", a.group_layers, "--resident", a.resident, "--wave", a.wave, "--batch-tokens", a.batch_tokens]
t0 = time.time()
run = subprocess.run(["mpirun", "--oversubscribe", "-np", str(a.ranks), "-x", "RAYON_NUM_THREADS", a.bin, "score", "--device", "cpu",
                      "--model", a.model, "--docs", a.docs, "--out", out_h5, "--overwrite", "--quiet"] + flags,
                     env=env, capture_output=True, text=True)
real_s = time.time() - t0
if run.returncode not in (0, 3):
    sys.exit(f"score failed ({run.returncode}):\n{run.stderr}")

# Prompt and choice sizes of the corpus, from the results file (h5dump needs no Python deps).
def dump(path):
    txt = subprocess.run(["h5dump", "-d", path, "-y", "-w", "0", out_h5], capture_output=True, text=True, env=env).stdout
    body = txt[txt.index("DATA {") + 6: txt.rindex("}")]
    return [int(x) for x in body.replace("}", "").split(",") if x.strip()]
prompt, n_choices, choice_tokens = dump("/docs/n_prompt_tokens"), dump("/docs/n_choices"), dump("/choices/n_tokens")
docs = len(prompt)
doc_tokens = round(sum(prompt) / docs)
choices = round(sum(n_choices) / docs)
ctoks = round(sum(choice_tokens) / max(1, len(choice_tokens)))

plan = subprocess.run([a.bin, "plan", "--model", a.model, "--ranks", str(a.ranks), "--device-mem", "8GB", "--costs", costs_json,
                       "--docs", str(docs), "--doc-tokens", str(doc_tokens), "--choices", str(choices), "--choice-tokens", str(ctoks),
                       "--json"] + flags, capture_output=True, text=True, env=env, check=True)
pred_s = json.loads(plan.stdout)["report"]["total_s"]
# The real wall time also holds start-up (MPI, reading weights, tokenizing): measure it with
# an empty corpus and take it off, since the simulator predicts the scoring itself.
empty = os.path.join(a.out, "simcheck-empty.jsonl")
open(empty, "w").close()
t0 = time.time()
subprocess.run(["mpirun", "--oversubscribe", "-np", str(a.ranks), "-x", "RAYON_NUM_THREADS", a.bin, "score", "--device", "cpu",
                "--model", a.model, "--docs", empty, "--out", os.path.join(a.out, "simcheck-empty.h5"), "--overwrite", "--quiet"] + flags,
               env=env, capture_output=True)
startup_s = time.time() - t0
scoring_s = real_s - startup_s
ratio = pred_s / scoring_s
print(f"ranks {a.ranks} on {cores} cores ({threads} thread(s) each, costs x{share:.2f}); corpus {docs} docs of ~{doc_tokens} prompt tokens, {choices} choices of ~{ctoks} tokens")
print(f"flags: {' '.join(flags)}")
print(f"real: {real_s:.2f} s wall, {startup_s:.2f} s start-up (empty corpus) -> {scoring_s:.2f} s scoring")
print(f"simulated: {pred_s:.2f} s   predicted / real = {ratio:.2f}  ({'within' if abs(ratio - 1) <= 0.25 else 'OUTSIDE'} 25%)")
json.dump({"real_s": real_s, "startup_s": startup_s, "scoring_s": scoring_s, "predicted_s": pred_s, "ratio": ratio},
          open(os.path.join(a.out, "simcheck.json"), "w"))
sys.exit(0 if abs(ratio - 1) <= 0.25 else 1)
