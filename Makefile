# The two commands that matter: `make demo` and `make test`. Both create .venv and install on first use.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/pip install --disable-pip-version-check -q -c constraints.txt
DEMO_OUT ?= runs/demo
PROTO_OUT := common/src

.PHONY: install demo test lint bench protos experiment clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python constraints.txt requirements-dev.txt common/pyproject.toml server/pyproject.toml client/pyproject.toml \
		lab/pyproject.toml
	$(PIP) torch==2.13.0
	$(PIP) -e common -e server -e client -e lab -r requirements-dev.txt
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/fedlora-lab demo --out $(DEMO_OUT)

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy common/src server/src client/src lab/src

bench: $(STAMP)
	@for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

protos: $(STAMP)
	$(BIN)/python tools/protoc.py

experiment: $(STAMP)
	$(BIN)/fedlora-lab experiment --config experiments/paper.yaml --out runs/experiment

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
