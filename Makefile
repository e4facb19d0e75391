# Two commands: `make run` serves the API, `make test` proves it.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Exact versions of every dependency (pyproject.toml gives the ranges): what make install,
# the benchmark's extras and the container image install. `make lock` renews it.
CONSTRAINTS := constraints.txt
# The tests' broker (make run uses RabbitMQ only when RABBITMQ_URL is set).
TEST_RABBITMQ_URL ?= amqp://guest:guest@127.0.0.1:5672/%2F

.PHONY: help install lock run migrate test test-unit lint format bench bench-smoke clean

help:
	@echo "make run      create .venv, install, migrate, serve on 127.0.0.1:5000"
	@echo "make test     unit, contract and integration tests (real PostgreSQL + RabbitMQ)"
	@echo "make lint     ruff, mypy --strict (workflows, tests, scripts, bench), import-linter"

$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c $(CONSTRAINTS) -e '.[dev,embedded]'
	touch $(STAMP)

install: $(STAMP)

# Resolve every dependency anew, the newest within pyproject.toml's ranges, in a venv of its
# own, and write their exact versions to constraints.txt. Then review the diff, run make test
# and make lint, and commit it. Also pinned: the lint tools of scripts/lint-tools.txt, the
# bench's matplotlib and bench/profile.py's py-spy.
LOCK_VENV := var/lock-venv
lock:
	rm -rf $(LOCK_VENV) build
	$(PYTHON) -m venv $(LOCK_VENV) || python3 -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install --quiet --upgrade pip
	$(LOCK_VENV)/bin/pip install --quiet '.[dev,embedded]' -r scripts/lint-tools.txt \
	  'matplotlib>=3.8' py-spy
	$(LOCK_VENV)/bin/pip check
	{ echo "# Exact versions of every dependency, for pip's -c (Makefile, bench/setup.sh,"; \
	  echo "# scripts/lint-infra.sh, infra/Dockerfile). Written by make lock, not by hand:"; \
	  echo "# pyproject.toml gives the ranges, scripts/lint-tools.txt the lint tools."; \
	  $(LOCK_VENV)/bin/pip freeze --exclude-editable --exclude workflows; } > $(CONSTRAINTS)
	rm -rf $(LOCK_VENV) build

run: $(STAMP)
	$(BIN)/workflows serve

migrate: $(STAMP)
	$(BIN)/workflows migrate

test: $(STAMP)
	RABBITMQ_URL="$${RABBITMQ_URL:-$(TEST_RABBITMQ_URL)}" $(BIN)/pytest -q

test-unit: $(STAMP)
	$(BIN)/pytest -q tests/unit

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	MYPYPATH=. $(BIN)/mypy bench  # scripts run from bench/: its modules import each other by bare name
	$(BIN)/lint-imports
	$(BIN)/openapi-spec-validator openapi.yaml
	VENV=$(VENV) bash scripts/lint-infra.sh

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache

# Benchmarks (bench/, docs/benchmarks.md): the service beside the raw limits of PostgreSQL
# and RabbitMQ, measured in the same run. Needs DATABASE_URL's server (it creates and drops
# a database of its own) and RABBITMQ_URL; installs wrk and matplotlib when missing.
bench: $(STAMP)
	VENV=$(VENV) bash bench/setup.sh
	$(BIN)/python bench/bench.py

# Seconds-long: proves the harness end to end (CI); never asserts a timing.
bench-smoke: $(STAMP)
	VENV=$(VENV) bash bench/setup.sh
	$(BIN)/python bench/bench.py --smoke

# Fault-injection suite (docs/chaos.md): kill -9 of API workers, a RabbitMQ outage, a
# PostgreSQL restart and dropped consume calls, under load, for both queue backends. It
# restarts the machine's PostgreSQL and RabbitMQ (and always brings them back).
.PHONY: chaos chaos-short
chaos: $(STAMP)
	$(BIN)/python -m scripts.chaos

chaos-short: $(STAMP)
	$(BIN)/python -m scripts.chaos --short
