# GPU checks: CUDA vs CPU parity for every op and whole tiny models, then a layer benchmark.
# Needs an NVIDIA GPU with CUDA 13 (libcuda, libcublasLt.so.13, libnvrtc.so.13); without one
# every parity test prints "skipped: no CUDA device" and passes.
# The GPU machines have no cargo: there, `make test-gpu` runs binaries built here with
# `make test-gpu-build` and carried over with the working tree (target/release).
.PHONY: test-gpu test-gpu-build

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
