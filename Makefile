# The two commands of the README: `make demo` and `make test`. Both create .venv and do all set-up.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench system-deps clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

system-deps:
	bash scripts/install-system-deps.sh

demo: $(STAMP)
	$(BIN)/qkdtls demo

test: system-deps $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/pytest -q -p no:cacheprovider

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

bench: $(STAMP)
	$(BIN)/python -m bench.kme_cycles
	$(BIN)/python -m bench.handshake

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
