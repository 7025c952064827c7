# The README's commands. Each one builds .venv from nothing when it is missing.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# torch/torchvision are pinned here (pyproject keeps a compatible range): these builds lie on local disk.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: venv test test-slow postgres lint demo bench clean

$(BIN)/jlstm: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_PINS)
	$(BIN)/pip install --quiet -e '.[dev]' $(TORCH_PINS)
	touch $(BIN)/jlstm

venv: $(BIN)/jlstm

lint: venv
	$(BIN)/ruff check .

# tests/test_deploy.py runs the tracking server on a real PostgreSQL 15 (Debian's binaries,
# started unprivileged in a temp dir): installed here when missing (root and apt). Where that
# fails the suite still runs, and pytest lists those tests as skipped with the reason.
PG_INITDB := /usr/lib/postgresql/15/bin/initdb

postgres:
	test -x $(PG_INITDB) || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql-15; } \
		|| echo "make: could not install postgresql-15; the tracking-server tests will skip" >&2

# `test`: everything but the end-to-end training runs (minutes); `test-slow`: those runs
# (`@pytest.mark.slow`: each trains on a local Ray cluster; about 40 min on 2 cores).
# CI (.ci/run) runs both.
test: venv lint postgres
	$(BIN)/pytest -m "not slow"

test-slow: venv postgres
	$(BIN)/pytest -m slow

demo: venv
	$(BIN)/jlstm demo

bench: venv
	$(BIN)/python benchmarks/joint_lstm.py --out benchmarks/results/joint_lstm.json

clean:
	rm -rf $(VENV) runs .pytest_cache
