# The README's commands. Each one builds .venv from nothing when it is missing.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# torch/torchvision are pinned here (pyproject keeps a compatible range): these builds lie on local disk.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: venv test lint demo bench clean

$(BIN)/jlstm: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_PINS)
	$(BIN)/pip install --quiet -e '.[dev]' $(TORCH_PINS)
	touch $(BIN)/jlstm

venv: $(BIN)/jlstm

lint: venv
	$(BIN)/ruff check .

test: venv lint
	$(BIN)/pytest

demo: venv
	$(BIN)/jlstm demo

bench: venv
	$(BIN)/python benchmarks/joint_lstm.py --out benchmarks/results/joint_lstm.json

clean:
	rm -rf $(VENV) runs .pytest_cache
