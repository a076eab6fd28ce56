# The two commands that matter: `make demo` and `make test`. Both create .venv and install on first use.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/pip install --disable-pip-version-check -q -c constraints.txt
DEMO_OUT ?= runs/demo
PROTO_OUT := common/src

.PHONY: install demo test lint bench protos experiment docs system-tools clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python constraints.txt requirements-dev.txt common/pyproject.toml server/pyproject.toml client/pyproject.toml \
		lab/pyproject.toml
	$(PIP) torch==2.13.0
	$(PIP) -e common -e server -e client -e 'lab[ray]' -r requirements-dev.txt
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/fedlora-lab demo --out $(DEMO_OUT)

test: $(STAMP) system-tools
	$(BIN)/python -m pytest -q

# What the deployment tests run besides Python: a real Prometheus (and promtool) and `ip netns`.
# Installed from Debian when missing (CI runs as root on a fresh Debian); where that is impossible,
# the tests that need them fail and say why: they never skip.
system-tools:
	@if command -v prometheus >/dev/null && command -v promtool >/dev/null && command -v ip >/dev/null; then :; \
	elif [ "$$(id -u)" -ne 0 ]; then \
		echo "system-tools: prometheus, promtool or ip missing and not root: apt-get install prometheus iproute2" >&2; \
	else \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
			prometheus iproute2 \
		|| echo "system-tools: could not install prometheus/iproute2; the deployment tests will fail" >&2; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy common/src server/src client/src lab/src

bench: $(STAMP)
	@for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

protos: $(STAMP)
	$(BIN)/python tools/protoc.py

docs: $(STAMP)
	$(BIN)/python docs/reference/generate.py

experiment: $(STAMP)
	$(BIN)/fedlora-lab experiment --config experiments/paper.yaml --out runs/experiment

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
