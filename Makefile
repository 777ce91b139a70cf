# streambus_consensus: every target runs inside .venv, created on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo demo-repeat test test-fast lint typecheck check bench bench-quick chaos mutation clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

## demo: start a three-node cluster on loopback, kill its leader, watch it recover
demo: $(STAMP)
	$(PY) examples/three_node_cluster.py

## demo-repeat: run the demo N times (default 20) and count failures and extra elections
demo-repeat: $(STAMP)
	$(PY) tools/repeat_demo.py -n $(or $(N),20)

## test: the whole suite (unit, property and multi-process cluster tests)
test: $(STAMP)
	$(PY) -m pytest -q

## test-fast: unit and property tests only, no node processes
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not cluster"

lint: $(STAMP)
	$(VENV)/bin/ruff check streambus_consensus tests examples tools

typecheck: $(STAMP)
	$(PY) -m mypy

check: lint typecheck test

## bench: benchmark suite -> BENCHMARKS.md + results/*.json (< 20 min); QUICK=1: smoke run (< 4 min) -> results/quick/
## (its etcd section apt-get installs etcd-server when missing, and is skipped if it cannot)
bench: $(STAMP)
	$(PY) -m pip install --quiet 'py-spy>=0.3' || echo "py-spy unavailable: the profile section will be skipped"
	$(PY) -m streambus_consensus.bench $(if $(QUICK),--quick,)

bench-quick:
	$(MAKE) bench QUICK=1

## chaos: long fault-injection soak; DURATION (seconds) and SEED are optional
chaos: $(STAMP)
	$(PY) -m streambus_consensus.testing.chaos --duration $(or $(DURATION),900) $(if $(SEED),--seed $(SEED),)

## mutation: mutmut on placement.py, config.py and fsm.py with their fast tests (not in
## make test; ~15 min on 2 cores); prints the score over non-message mutants per file
mutation: $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev,mutation]'
	rm -rf mutants
	$(VENV)/bin/mutmut run --max-children $(or $(JOBS),2) > mutants-run.log 2>&1 || (tail -40 mutants-run.log; exit 1)
	$(PY) tools/mutation_score.py --json mutants/score.json $(if $(SURVIVORS),--survivors,)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache mutants mutants-run.log
