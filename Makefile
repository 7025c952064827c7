# The README's commands. Each one builds .venv from nothing when it is missing.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# torch/torchvision are pinned here (pyproject keeps a compatible range): these builds lie on local disk.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
PIP_TOOLS := pip-tools==7.6.2

.PHONY: venv lock test test-slow postgres lint demo bench clean

# Every package at the version of requirements.lock (Python 3.11, Linux x86_64, the `dev`
# extra included), then this project itself without resolving anything again.
$(BIN)/jlstm: pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(BIN)/jlstm

venv: $(BIN)/jlstm

# Re-resolve requirements.lock from pyproject.toml's ranges (and TORCH_PINS), as pip sees
# the package indexes and find-links configured on this machine.
lock: venv
	$(BIN)/pip install --quiet $(PIP_TOOLS)
	printf '%s\n' $(TORCH_PINS) > $(VENV)/torch-pins.txt
	$(BIN)/pip-compile --quiet --strip-extras --extra dev --no-emit-index-url \
		--no-emit-find-links --constraint $(VENV)/torch-pins.txt \
		--output-file requirements.lock pyproject.toml

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
