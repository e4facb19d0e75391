# Two commands: `make run` serves the API, `make test` proves it.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The tests' broker (make run uses RabbitMQ only when RABBITMQ_URL is set).
TEST_RABBITMQ_URL ?= amqp://guest:guest@127.0.0.1:5672/%2F

.PHONY: help install run migrate test test-unit lint format bench bench-smoke clean

help:
	@echo "make run      create .venv, install, migrate, serve on 127.0.0.1:5000"
	@echo "make test     unit, contract and integration tests (real PostgreSQL + RabbitMQ)"
	@echo "make lint     ruff, mypy --strict, import-linter"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,embedded]'
	touch $(STAMP)

install: $(STAMP)

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
