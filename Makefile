# SEA: label pipeline and trainer. `make help` lists the targets.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# STAMP: the project and what its commands use (demo, labels, training: tensorboard logging);
# DEV: that and the test tools (pytest, ruff, playwright, polars, wandb), for test and lint only
STAMP  := $(VENV)/.installed
DEV    := $(VENV)/.installed-dev
EXTRAS ?= tensorboard
CONFIG ?= configs/extract.yaml
TRAIN_CONFIG ?= configs/pretrain.yaml
FT_CONFIG ?= configs/finetune.yaml
NPROC  ?= 1
ARGS   ?=

.DEFAULT_GOAL := help
.PHONY: help setup demo evidence test test-fast lint labels submit ray-up ray-down train-pretrain train-finetune paper bench clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

setup: $(STAMP) ## create .venv, install the project and check the shipped 2of12 list

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	$(PY) -m wordlist check
	touch $@

$(DEV): $(STAMP)
	$(PY) -m pip install -q -e '.[dev,$(EXTRAS)]'
	touch $@

demo: $(STAMP) ## the ground-truth world, short: labels scored against truth, stage 1 lambda 0 and 1 (demo_out/)
	$(PY) -m world demo --out demo_out

evidence: $(STAMP) ## label precision and SEA's effect in the ground-truth world -> EVIDENCE.md (QUICK=1: < 3 min, evidence_quick/)
ifdef QUICK
	$(PY) -m world evidence --quick --out evidence_quick --md evidence_quick/EVIDENCE.md
else
	$(PY) -m world evidence --out evidence --md EVIDENCE.md
endif

test: $(DEV) lint ## lint, then the whole test suite
	$(PY) -m pytest -q

test-fast: $(DEV) ## the inner loop (about 3 min on 2 cores): no torchrun, no Ray, no world training
	$(PY) -m pytest -q -m "not slow and not ray"

lint: $(DEV) ## ruff (configured in pyproject.toml)
	$(VENV)/bin/ruff check .

labels: $(STAMP) ## label extraction: CONFIG=configs/extract.yaml ARGS='key=value ...'
	$(PY) -m pipeline extract --config $(CONFIG) $(ARGS)

submit: $(STAMP) ## ray job submit the extraction: RAY_ADDRESS=http://head:8265 CONFIG=... ARGS='...'
	@test -n "$(RAY_ADDRESS)" || { echo "set RAY_ADDRESS=http://<head>:8265"; exit 2; }
	$(PY) -m pipeline submit --address $(RAY_ADDRESS) --config $(CONFIG) $(ARGS)

ray-up: $(STAMP) ## start a local Ray head on 127.0.0.1 (token auth; dashboard on loopback :8265), in .ray-head/
	RAY_AUTH_MODE=token $(PY) -m pipeline ray-up --temp-dir .ray-head

ray-down: $(STAMP) ## stop the Ray head ray-up started (only it: other Ray instances keep running)
	$(PY) -m pipeline ray-down --temp-dir .ray-head

train-pretrain: $(STAMP) ## SEA stage 1 (adapter only): TRAIN_CONFIG=configs/pretrain.yaml NPROC=1 ARGS='...'
	$(VENV)/bin/torchrun --nproc-per-node $(NPROC) -m trainer pretrain --config $(TRAIN_CONFIG) $(ARGS)

train-finetune: $(STAMP) ## stage 2 (LLM + adapter): FT_CONFIG=configs/finetune.yaml NPROC=1 ARGS='key=value ...'
	$(VENV)/bin/torchrun --nproc-per-node $(NPROC) -m trainer finetune --config $(FT_CONFIG) $(ARGS)

paper: $(STAMP) ## one row of the paper (Tables 1-3): ROW=... DATA=/datasets NPROC=8 (no ROW: list them)
	@test -n "$(ROW)" || { $(PY) -m paper list; echo "set ROW=<one of the rows above>"; exit 2; }
	$(PY) -m paper run $(ROW) --data-root $(or $(DATA),data) --nproc $(NPROC) $(ARGS)

bench: $(DEV) ## benchmarks (about 16 + 8 min on 2 cores) -> BENCHMARKS.md and bench/results.json
	$(PY) bench/bench.py

clean: ## remove demo output and caches (keeps .venv)
	rm -rf demo_out evidence_quick evidence/work .pytest_cache .ruff_cache
