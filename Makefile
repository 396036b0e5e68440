# Two commands for a newcomer: `make run` (venv, install, dev gateway) and `make test` (everything).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install run test lint typecheck unit token bench bench-quick soak clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

run: install  ## development gateway on :4010 (embedded bus if no Redis answers)
	$(BIN)/tornado-gateway --dev --conf conf/development.conf

token: install  ## a dev token: make token USER=u1 TYPE=driver
	@$(BIN)/tornado-gateway --dev token --sub $(or $(USER_ID),u1) --user-type $(or $(TYPE),driver)

lint: install
	$(BIN)/ruff check .

typecheck: install
	$(BIN)/mypy --strict tornado_gateway scripts

unit: install
	$(BIN)/pytest -q

test: lint typecheck unit  ## ruff, mypy --strict and the whole pytest suite

bench: install  ## the benchmarks behind docs/BENCHMARKS.md (~35 min: 20K users x 3 runs, then the 100K hold)
	$(BIN)/python scripts/bench.py
	$(BIN)/python scripts/bench.py --hold-100k
	$(BIN)/python scripts/storm.py --write-doc  # reconnect storm: 20K clients dropped at once, resumed with since (~3 min)

bench-quick: install  ## a 3-minute version of the same scenarios
	$(BIN)/python scripts/bench.py --quick

soak: install  ## long churn and storm runs (minutes)
	$(BIN)/pytest -q -m soak --run-soak tests/

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache
